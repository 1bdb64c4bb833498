"""The sweep folder may be a local path or a URI (s3://, gs://): lmm_ray's own files go through pyarrow."""

from lmm_ray.results import Store


def test_store_round_trips_on_a_uri_and_a_path(tmp_path):
    src = tmp_path / "table.csv"
    src.write_text("a,b\n1,2\n")
    for root in (f"file://{tmp_path}/uri-sweep", str(tmp_path / "local-sweep")):
        s = Store(root)
        assert s.is_uri == root.startswith("file://")
        assert not s.exists("sweep.json")
        s.write_text("sweep.json", '{"name": "x"}')
        assert s.exists("sweep.json") and s.read_text("sweep.json") == '{"name": "x"}'
        if s.is_uri:
            s.put(src, "table.csv")
            assert (tmp_path / "uri-sweep" / "table.csv").read_text() == "a,b\n1,2\n"
