import json, os
from datasets import load_dataset

out = os.environ.get("SALIENT_OUT", "demo-out/build")  # the output root: the config's `output`
build = os.path.join(out, json.load(open(os.path.join(out, "latest")))["path"])

index = load_dataset("parquet", data_files=os.path.join(build, "masks/index.parquet"), split="train")
spurious = index.filter(lambda r: r["label"] == "spurious")
print(f"{len(index)} masks, {len(spurious)} from spurious pairs over {len(set(spurious['relpath']))} images")
print(spurious.select_columns(["row", "relpath", "feature_index", "kind"])[0])
