import json, os
import duckdb

out = os.environ.get("SALIENT_OUT", "demo-out/build")  # the output root: the config's `output`
build = os.path.join(out, json.load(open(os.path.join(out, "latest")))["path"])

rows = duckdb.sql(f"""
    SELECT c.name, count(*) AS spurious_pairs, list(l.feature_index ORDER BY l.feature_rank) AS features
    FROM '{build}/annotations/labels.parquet' AS l JOIN '{build}/classes.parquet' AS c USING (class_index)
    WHERE l.label = 'spurious'
    GROUP BY c.name ORDER BY c.name
""").fetchall()
for name, n, features in rows:
    print(f"{name}: {n} spurious pairs, features {features}")
