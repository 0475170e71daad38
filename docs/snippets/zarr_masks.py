import json, os
import pyarrow.parquet as pq
import zarr

out = os.environ.get("SALIENT_OUT", "demo-out/build")  # the output root: the config's `output`
build = os.path.join(out, json.load(open(os.path.join(out, "latest")))["path"])

index = pq.read_table(os.path.join(build, "masks/index.parquet"), columns=["row", "relpath", "feature_index", "label"])
masks = zarr.open_array(os.path.join(build, "masks/masks.zarr"), mode="r")  # uint8 [n, H, W], row i = index row i
print(f"masks {masks.shape} {masks.dtype}")
first = index.slice(0, 1).to_pylist()[0]
mask = masks[first["row"]]  # round(255 * NAM)
print(f"{first['relpath']} feature {first['feature_index']} ({first['label']}): max {mask.max()}, mean {mask.mean() / 255:.3f}")
