import json, os
import pandas as pd

out = os.environ.get("SALIENT_OUT", "demo-out/build")  # the output root: the config's `output`
build = os.path.join(out, json.load(open(os.path.join(out, "latest")))["path"])

labels = pd.read_parquet(os.path.join(build, "annotations/labels.parquet"))
classes = pd.read_parquet(os.path.join(build, "classes.parquet"), columns=["class_index", "name"])
pairs = labels.merge(classes, on="class_index")
print(pd.crosstab(pairs["name"], pairs["label"]))  # pairs per class and label
for p in pairs[pairs.label == "spurious"].sort_values(["class_index", "feature_rank"]).itertuples():
    print(f"spurious: {p.name} feature {p.feature_index} ({p.kind})")
