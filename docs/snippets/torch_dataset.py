import json, os
from torch.utils.data import DataLoader
from salient.dataset import SalientDataset

out = os.environ.get("SALIENT_OUT", "demo-out/build")  # the output root: the config's `output`
build = os.path.join(out, json.load(open(os.path.join(out, "latest")))["path"])

config = json.load(open(os.path.join(build, "manifest.json")))["inputs"]["config"]  # what the build read
data = SalientDataset(out, config["dataset"]["root"], config["preprocess"]["resize"], config["preprocess"]["crop"])
image, core, spurious, label = next(iter(DataLoader(data, batch_size=4)))
print(f"{len(data)} images; batch: image {tuple(image.shape)}, core {tuple(core.shape)}, spurious {tuple(spurious.shape)}")
print(f"labels {label.tolist()}, spurious mask max {spurious[0].max():.3f}")
