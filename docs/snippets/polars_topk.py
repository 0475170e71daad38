import json, os
import polars as pl

out = os.environ.get("SALIENT_OUT", "demo-out/build")  # the output root: the config's `output`
build = os.path.join(out, json.load(open(os.path.join(out, "latest")))["path"])

spurious = (
    pl.read_parquet(os.path.join(build, "annotations/labels.parquet"))
    .filter(pl.col("label") == "spurious")
    .select("class_index", "feature_index")
)
top = pl.read_parquet(os.path.join(build, "topk/class.parquet")).join(spurious, on=["class_index", "feature_index"])
print(f"{top.height} top images of {spurious.height} spurious pairs")
for row in top.filter(pl.col("rank") == 1).sort("class_index", "feature_index").iter_rows(named=True):
    print(f"class {row['class_index']} feature {row['feature_index']}: {row['relpath']}")
