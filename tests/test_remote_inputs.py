"""Input readers for remote and container inputs (vggfeat.data: remote, webdataset, parquet,
urls), on real files, a moto S3 server and a threaded HTTP server, all on 127.0.0.1."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import socket
import sys
import tarfile
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from vggfeat.data import BadImage, decode_image
from vggfeat.data.remote import (ObjectId, Sample, expand, is_url, object_identity,
                                 open_binary)
from vggfeat.data.webdataset import iter_tar, split_key
from vggfeat.errors import InputError, MissingDependencyError

from conftest import moto_bucket

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def encoded(fmt: str = "JPEG", size=(40, 30), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


JPEG, PNG = encoded("JPEG"), encoded("PNG", color=(10, 200, 10))


def write_tar(path, members, mtime=1_700_000_000):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue
            info.size, info.mtime = len(data), mtime
            tar.addfile(info, io.BytesIO(data))
    return str(path)


SHARD = [("s/a.jpg", JPEG), ("s/a.cls", b" 3\n"),
         ("s/b.png", PNG), ("s/b.json", json.dumps({"label": "cat"}).encode()),
         ("dir", None),
         ("s/c.txt", b"only text"), ("s/c.json", b"{}"),
         ("s/d.jpg", b"not a jpeg"), ("s/d.cls", b"dog"),
         ("x.seg.jpg", JPEG), ("x.json", json.dumps({"cls": 7}).encode())]


# ---- names, patterns, identity -----------------------------------------------------------------

def test_urls_and_paths_are_told_apart():
    for url in ("s3://b/k.tar", "gs://b/k", "https://h/x.jpg", "file:///tmp/x", "memory://x",
                "simplecache::s3://b/k"):
        assert is_url(url), url
    for path in ("/tmp/x.tar", "shards/a.tar", "C:\\data\\a.tar", "C://data/a.tar", "a:b"):
        assert not is_url(path), path


def test_expand_braces_and_globs_over_local_files(tmp_path):
    for i in range(4):
        write_tar(tmp_path / f"train-{i:03d}.tar", SHARD[:2])
    base = str(tmp_path)
    names = [f"{base}/train-{i:03d}.tar" for i in range(4)]
    assert expand(f"{base}/train-{{000..003}}.tar") == names
    assert expand(f"{base}/train-*.tar") == names
    assert expand(f"{base}/train-00?.tar") == names
    # braces first, then each part globbed; repeats dropped, order as expanded
    assert expand(f"{base}/train-{{002,00*}}.tar") == [names[2]] + names[:2] + names[3:]
    assert expand(f"file://{base}/train-{{000..001}}.tar") == [f"file://{n}" for n in names[:2]]
    for pattern in (f"{base}/valid-*.tar", f"{base}/train-{{004..005}}.tar"):
        with pytest.raises(InputError, match="matches nothing") as err:
            expand(pattern)
        assert pattern in str(err.value)


def test_local_identity_and_missing_objects(tmp_path):
    path = write_tar(tmp_path / "a.tar", SHARD[:2])
    ident = object_identity(path)
    assert ident == ObjectId(size=os.path.getsize(path), mtime_ns=os.stat(path).st_mtime_ns,
                             etag="")
    assert object_identity(f"file://{path}") == ident
    for missing in (str(tmp_path / "no.tar"), f"file://{tmp_path}/no.tar"):
        with pytest.raises(InputError, match="not found") as err:
            object_identity(missing)
        assert missing in str(err.value)
        with pytest.raises(InputError, match="not found"), open_binary(missing):
            pass
    with open_binary(f"file://{path}") as f:
        assert f.read() == open(path, "rb").read()


def test_a_missing_backend_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "s3fs", None)  # what an uninstalled package looks like
    with pytest.raises(MissingDependencyError, match=r'vggfeat\[remote\]'):
        object_identity("s3://bucket/key.tar")


# ---- WebDataset tars ---------------------------------------------------------------------------

def test_split_key_is_webdatasets_rule():
    assert split_key("a/b/x.seg.jpg") == ("a/b/x", "seg.jpg")
    assert split_key("x.jpg") == ("x", "jpg")
    assert split_key("a.b/c.PNG") == ("a.b/c", "PNG")
    assert split_key("README") is None and split_key("a/.hidden.jpg") is None


def test_iter_tar_groups_members_into_samples(tmp_path, monkeypatch):
    path = write_tar(tmp_path / "shard.tar", SHARD)
    samples = list(iter_tar(path))
    assert [s.key for s in samples] == [f"{path}#{k}" for k in ("s/a", "s/b", "s/c", "s/d", "x")]
    a, b, c, d, x = samples
    assert (a.data, a.label, a.reason, a.size) == (JPEG, "3", None, len(JPEG))
    assert a.sha256 == hashlib.sha256(JPEG).digest() and a.mtime_ns == 1_700_000_000 * 10**9
    assert decode_image(a.data).shape == (3, 30, 40)
    assert (b.data, b.label) == (PNG, "cat")
    assert c.data is None and c.reason == "no image member (has: .txt, .json)"
    assert (c.size, c.sha256) == (-1, bytes(32))
    assert d.data == b"not a jpeg" and d.label == "dog"  # decoding is the caller's business
    with pytest.raises(BadImage, match="not an image"):
        decode_image(d.data)
    assert (x.data, x.label) == (JPEG, "7")
    # the same samples from a relative path and from a gzipped tar
    monkeypatch.chdir(tmp_path)
    assert [s.key for s in iter_tar("shard.tar")] == [s.key for s in samples]
    (tmp_path / "z.tgz").write_bytes(gzip.compress((tmp_path / "shard.tar").read_bytes()))
    assert [s.data for s in iter_tar(str(tmp_path / "z.tgz"))] == [s.data for s in samples]


def test_a_damaged_tar_yields_its_whole_samples_then_raises(tmp_path):
    """Documented choice: the complete samples read before the damage come first, then an
    InputError naming the shard; the sample being read when the stream broke is dropped."""
    whole = open(write_tar(tmp_path / "whole.tar", SHARD), "rb").read()
    # cut inside s/b.json's data: s/a was complete, s/b may not be
    offset = whole.index(b'{"label"') + 3
    for cut, done in ((offset, ["s/a"]), (whole.index(b"only text") + 3, ["s/a", "s/b"]),
                      (512 * 3, [])):
        path = tmp_path / f"cut{cut}.tar"
        path.write_bytes(whole[:cut])
        seen = []
        with pytest.raises(InputError, match="not a readable tar") as err:
            for sample in iter_tar(str(path)):
                seen.append(sample.key.split("#")[1])
        assert seen == done and str(path) in str(err.value)
        assert f"{len(done)} samples were read" in str(err.value)
    (tmp_path / "text.tar").write_bytes(b"this is not a tar" * 100)
    with pytest.raises(InputError, match="not a readable tar"):
        list(iter_tar(str(tmp_path / "text.tar")))
    with pytest.raises(InputError, match="not found"):
        list(iter_tar(str(tmp_path / "missing.tar")))


# ---- S3 (moto) ---------------------------------------------------------------------------------

@pytest.fixture(params=["AWS_ENDPOINT_URL", "FSSPEC_S3_ENDPOINT_URL"])
def s3(request, moto_server, monkeypatch):
    """An s3fs that finds the moto endpoint the standard way: botocore reads AWS_ENDPOINT_URL,
    fsspec's config FSSPEC_S3_ENDPOINT_URL (when fsspec is imported: re-read here)."""
    yield from moto_bucket(moto_server, monkeypatch, request.param,
                           f"b{request.param_index}{int(time.time() * 1000) % 10**6}")


def test_shards_on_s3_read_like_local_ones(s3, tmp_path):
    fs, bucket = s3
    local = write_tar(tmp_path / "x.tar", SHARD)
    for i in range(3):
        fs.put(local, f"{bucket}/shards/train-{i:03d}.tar")
    names = [f"s3://{bucket}/shards/train-{i:03d}.tar" for i in range(3)]
    assert expand(f"s3://{bucket}/shards/train-{{000..002}}.tar") == names
    assert expand(f"s3://{bucket}/shards/train-*.tar") == names
    with pytest.raises(InputError, match="matches nothing"):
        expand(f"s3://{bucket}/shards/valid-*.tar")
    remote = list(iter_tar(names[1]))
    expected = list(iter_tar(local))
    assert [s.key.split("#")[1] for s in remote] == [s.key.split("#")[1] for s in expected]
    assert [(s.data, s.label, s.reason) for s in remote] == \
        [(s.data, s.label, s.reason) for s in expected]
    assert remote[0].key == f"{names[1]}#s/a"
    ident = object_identity(names[1])
    assert ident.size == os.path.getsize(local) and ident.etag.strip('"')
    assert ident.mtime_ns > 0
    with pytest.raises(InputError, match="not found"):
        object_identity(f"s3://{bucket}/shards/nothing.tar")


def test_images_and_parquet_files_on_s3(s3, tmp_path):
    from vggfeat.data.parquet import inspect_parquet, iter_row_group
    from vggfeat.data.urls import Fetcher

    fs, bucket = s3
    fs.pipe(f"{bucket}/imgs/a.jpg", JPEG)
    pq.write_table(pa.table({"path": ["imgs/a.jpg", "imgs/none.jpg"]}), tmp_path / "p.parquet")
    fs.put(str(tmp_path / "p.parquet"), f"{bucket}/p.parquet")
    fetcher = Fetcher(retries=0)
    a, none = fetcher.fetch([f"s3://{bucket}/imgs/a.jpg", f"s3://{bucket}/imgs/none.jpg"])
    assert a.data == JPEG and a.mtime_ns > 0 and none.reason.startswith("not found")
    ident, missing = fetcher.head([f"s3://{bucket}/imgs/a.jpg", f"s3://{bucket}/imgs/no.jpg"])
    assert ident.size == len(JPEG) and ident.etag and missing is None
    info = inspect_parquet(f"s3://{bucket}/p.parquet")
    rows = list(iter_row_group(info, 0, fetcher))
    assert [r.key for r in rows] == [f"s3://{bucket}/p.parquet#0", f"s3://{bucket}/p.parquet#1"]
    assert rows[0].data == JPEG
    assert rows[1].reason.startswith(f"s3://{bucket}/imgs/none.jpg: not found")


# ---- Parquet -----------------------------------------------------------------------------------

def hf_table(n: int, names=("cat", "dog", "bird")):
    images = [{"bytes": JPEG if i % 2 else PNG, "path": f"img{i}.jpg"} for i in range(n)]
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    meta = {"info": {"features": {
        "image": {"_type": "Image"},
        "label": {"names": list(names), "_type": "ClassLabel"}}}}
    table = pa.table({"image": pa.array(images, struct),
                      "label": pa.array([i % len(names) for i in range(n)], pa.int64())})
    return table.replace_schema_metadata({"huggingface": json.dumps(meta)})


def test_hf_parquet_is_read_one_row_group_at_a_time(tmp_path):
    from vggfeat.data.parquet import inspect_parquet, iter_row_group

    path = str(tmp_path / "train-00000-of-00001.parquet")
    pq.write_table(hf_table(7), path, row_group_size=3)
    info = inspect_parquet(path)
    assert (info.num_rows, info.row_groups, info.kind) == (7, [3, 3, 1], "bytes")
    assert (info.image_column, info.label_column) == ("image", "label")
    assert info.class_names == ["cat", "dog", "bird"]
    samples = [s for g in range(len(info.row_groups)) for s in iter_row_group(info, g)]
    assert [s.key for s in samples] == [f"{path}#{i}" for i in range(7)]
    assert [s.label for s in samples] == ["cat", "dog", "bird"] * 2 + ["cat"]
    assert [s.data for s in samples] == [JPEG if i % 2 else PNG for i in range(7)]
    assert all(s.mtime_ns == -1 and s.reason is None for s in samples)
    with pytest.raises(InputError, match="no group 3"):
        list(iter_row_group(info, 3))


def test_parquet_paths_and_null_bytes_are_read_beside_the_file(tmp_path):
    from vggfeat.data.parquet import inspect_parquet, iter_row_group
    from vggfeat.data.urls import Fetcher

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(JPEG)
    (tmp_path / "imgs" / "b.png").write_bytes(PNG)
    table = pa.table({"image_path": ["imgs/a.jpg", str(tmp_path / "imgs" / "b.png"),
                                     "imgs/gone.jpg", None],
                      "label": ["x", "y", "z", None]})
    path = str(tmp_path / "paths.parquet")
    pq.write_table(table, path, row_group_size=2)
    info = inspect_parquet(path)
    assert (info.kind, info.image_column, info.class_names) == ("path", "image_path", None)
    fetcher = Fetcher(retries=0, concurrency=2)
    got = [s for g in (0, 1) for s in iter_row_group(info, g, fetcher)]
    assert [s.data for s in got] == [JPEG, PNG, None, None]
    assert [s.label for s in got] == ["x", "y", "z", None]
    assert got[2].reason == f"{tmp_path}/imgs/gone.jpg: not found (check the path or URL)"
    assert "null" in got[3].reason and got[0].mtime_ns == -1
    # a {bytes, path} struct whose bytes are null is read from its path
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"img": pa.array([{"bytes": None, "path": "imgs/a.jpg"}], struct)}),
                   tmp_path / "nulls.parquet")
    info = inspect_parquet(str(tmp_path / "nulls.parquet"))
    assert (info.image_column, info.label_column) == ("img", None)
    assert [s.data for s in iter_row_group(info, 0, fetcher)] == [JPEG]


def test_parquet_columns_are_named_or_the_error_lists_them(tmp_path):
    from vggfeat.data.parquet import inspect_parquet, iter_row_group

    path = str(tmp_path / "odd.parquet")
    pq.write_table(pa.table({"picture": [JPEG], "target": [4], "note": ["n"]}), path)
    with pytest.raises(InputError) as err:
        inspect_parquet(path)
    message = str(err.value)
    assert path in message and "picture, target, note" in message
    assert "--image-column" in message and "--label-column" in message
    info = inspect_parquet(path, image_column="picture", label_column="target")
    assert (info.kind, info.label_column) == ("bytes", "target")
    assert [(s.data, s.label) for s in iter_row_group(info, 0)] == [(JPEG, "4")]
    with pytest.raises(InputError, match="no column 'labels' .--label-column"):
        inspect_parquet(path, image_column="picture", label_column="labels")
    with pytest.raises(InputError, match="holds int64, not images"):
        inspect_parquet(path, image_column="target")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        inspect_parquet(str(tmp_path / "junk.parquet"))


# ---- URL lists ---------------------------------------------------------------------------------

def test_read_url_list_txt_csv_parquet(tmp_path):
    from vggfeat.data.urls import read_url_list

    (tmp_path / "l.txt").write_text("# images\nhttp://h/a.jpg\n\n  s3://b/c.png  \n")
    assert read_url_list(str(tmp_path / "l.txt")) == [("http://h/a.jpg", None),
                                                     ("s3://b/c.png", None)]
    (tmp_path / "l.csv").write_text("\ufeffurl, label\nhttp://h/a.jpg,cat\nhttp://h/b.jpg,\n")
    assert read_url_list(f"file://{tmp_path}/l.csv") == [("http://h/a.jpg", "cat"),
                                                         ("http://h/b.jpg", None)]
    pq.write_table(pa.table({"url": ["u1", "u2", "u3"], "label": [1, None, 3]}),
                   tmp_path / "l.parquet", row_group_size=2)
    assert read_url_list(str(tmp_path / "l.parquet")) == [("u1", "1"), ("u2", None), ("u3", "3")]
    (tmp_path / "bad.csv").write_text("link,label\nhttp://h/a.jpg,cat\n")
    pq.write_table(pa.table({"href": ["u"]}), tmp_path / "bad.parquet")
    for bad, columns in (("bad.csv", "link, label"), ("bad.parquet", "href")):
        with pytest.raises(InputError, match="no 'url' column") as err:
            read_url_list(str(tmp_path / bad))
        assert bad in str(err.value) and columns in str(err.value)
    with pytest.raises(InputError, match=".txt"):
        read_url_list(str(tmp_path / "l.json"))


# ---- HTTP --------------------------------------------------------------------------------------

MODIFIED = 1_700_000_000


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    tries: dict[str, int] = {}
    lock = threading.Lock()

    def log_message(self, *args):  # quiet
        pass

    def _count(self) -> int:
        with self.lock:
            self.tries[self.path] = self.tries.get(self.path, 0) + 1
            return self.tries[self.path]

    def _send(self, code, body=b"", headers=None, length=None):
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if self.command != "HEAD":
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up on a slow answer: what the test wants

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        n = self._count()
        good = {"ETag": '"abc123"', "Last-Modified": formatdate(MODIFIED, usegmt=True)}
        path = self.path.split("?")[0]  # a query makes distinct URLs of one resource
        if path == "/good.jpg":
            self._send(200, JPEG, good)
        elif path == "/flaky.jpg":
            self._send(500, b"oops") if n == 1 else self._send(200, JPEG)
        elif path == "/down.jpg":
            self._send(503, b"busy")
        elif path == "/slow.jpg":
            time.sleep(0.6)
            self._send(200, JPEG)
        elif path == "/cut.jpg":
            self._send(200, JPEG[:100], length=len(JPEG))
            self.close_connection = True
        elif path == "/moved.jpg":
            self._send(302, b"", {"Location": "/good.jpg"})
        elif path == "/loop.jpg":
            self._send(302, b"", {"Location": "/loop.jpg"})
        elif path == "/big.jpg":
            self._send(200, b"x" * 5000)
        elif path == "/plain.jpg":  # no ETag, no Last-Modified, no Content-Length
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
        else:
            self._send(404, b"no")


@pytest.fixture(scope="module")
def http_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def tries(http_server):
    Handler.tries.clear()
    return Handler.tries


def test_fetch_retries_what_may_pass_and_names_every_failure(http_server, tries):
    from vggfeat.data.urls import Fetcher

    pytest.importorskip("requests")
    fetcher = Fetcher(timeout=0.3, retries=2, backoff=0.01, max_bytes=4096, concurrency=4)
    names = ["good", "missing", "flaky", "down", "slow", "cut", "moved", "big", "good"]
    urls = [f"{http_server}/{n}.jpg" for n in names]
    started = time.monotonic()
    got = list(fetcher.fetch(urls))
    assert [s.key for s in got] == urls  # in input order, whatever finished first
    by = dict(zip(names, got))
    assert (by["good"].data, by["good"].mtime_ns) == (JPEG, MODIFIED * 10**9)
    assert by["good"].sha256 == hashlib.sha256(JPEG).digest()
    assert by["missing"].reason == "HTTP 404 Not Found" and tries["/missing.jpg"] == 1
    assert by["flaky"].data == JPEG and tries["/flaky.jpg"] == 2 and by["flaky"].mtime_ns == -1
    assert by["down"].reason == "HTTP 503 Service Unavailable (3 tries)"
    assert tries["/down.jpg"] == 3
    assert by["slow"].reason == "timed out after 0.3 s (3 tries)"
    assert by["cut"].reason == f"truncated: got 100 of {len(JPEG)} bytes (3 tries)"
    assert tries["/cut.jpg"] == 3
    assert by["moved"].data == JPEG
    assert by["big"].reason.startswith("larger than 4096 bytes (size cap")
    assert tries["/big.jpg"] == 1
    assert all(s.size == -1 and s.sha256 == bytes(32) for s in got if s.data is None)
    assert time.monotonic() - started < 10


def test_fetch_fails_at_once_on_redirect_loops_refused_connections_and_bad_urls(http_server):
    from vggfeat.data.urls import Fetcher

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/x.jpg"
    fetcher = Fetcher(timeout=1, retries=1, backoff=0.01, max_redirects=3)
    loop, refused, plain = fetcher.fetch([f"{http_server}/loop.jpg", closed,
                                          f"{http_server}/plain.jpg"])
    assert loop.reason == "more than 3 redirects"
    assert refused.reason.startswith("connection error: ") and "(2 tries)" in refused.reason
    assert plain.data == b"" and plain.mtime_ns == -1  # decoding an empty body is the caller's


def test_stopping_a_fetch_early_drops_the_queued_downloads(http_server, tries):
    from vggfeat.data.urls import Fetcher

    urls = [f"{http_server}/slow.jpg?{i}" for i in range(40)]
    started = time.monotonic()
    fetched = Fetcher(timeout=5, retries=0, concurrency=2).fetch(urls)
    assert next(fetched).data == JPEG
    fetched.close()
    assert time.monotonic() - started < 3  # not the 40 × 0.6 s / 2 the whole list would take
    time.sleep(0.7)  # the downloads running at the close finish; nothing more starts
    assert sum(tries.values()) <= 6


def test_head_gives_identity_without_downloading(http_server, tries, tmp_path):
    from vggfeat.data.urls import Fetcher

    local = tmp_path / "a.jpg"
    local.write_bytes(JPEG)
    fetcher = Fetcher(timeout=0.5, retries=1, backoff=0.01)
    good, missing, moved, plain, disk, gone = fetcher.head(
        [f"{http_server}/good.jpg", f"{http_server}/missing.jpg", f"{http_server}/moved.jpg",
         f"{http_server}/plain.jpg", str(local), f"file://{tmp_path}/gone.jpg"])
    assert good == ObjectId(size=len(JPEG), mtime_ns=MODIFIED * 10**9, etag='"abc123"')
    assert moved == good and missing is None and plain is None and gone is None
    assert disk == object_identity(str(local))
    assert tries["/missing.jpg"] == 1
    # object_identity over http uses fsspec's HEAD: the same answer
    pytest.importorskip("aiohttp")
    http = object_identity(f"{http_server}/good.jpg")
    assert (http.size, http.etag, http.mtime_ns) == (len(JPEG), '"abc123"', MODIFIED * 10**9)


def test_fetch_reads_other_urls_through_fsspec(tmp_path):
    from vggfeat.data.urls import Fetcher

    (tmp_path / "a.jpg").write_bytes(JPEG)
    (tmp_path / "big.jpg").write_bytes(b"x" * 100)
    fetcher = Fetcher(retries=1, backoff=0.01, max_bytes=50)
    a, url_a, big, gone, odd = fetcher.fetch([str(tmp_path / "a.jpg"), f"file://{tmp_path}/a.jpg",
                                              str(tmp_path / "big.jpg"),
                                              str(tmp_path / "gone.jpg"), "nosuch://x/y.jpg"])
    assert a.reason.startswith("larger than 50 bytes")
    fetcher = Fetcher(retries=1, backoff=0.01)
    a, url_a = fetcher.fetch([str(tmp_path / "a.jpg"), f"file://{tmp_path}/a.jpg"])
    assert a.data == url_a.data == JPEG
    assert a.mtime_ns == os.stat(tmp_path / "a.jpg").st_mtime_ns
    assert gone.reason == "not found (check the path or URL)"
    assert "unknown protocol" in odd.reason


def test_sample_constructors():
    ok = Sample.ok("k", b"abc", "lab", 5)
    assert (ok.size, ok.sha256, ok.reason) == (3, hashlib.sha256(b"abc").digest(), None)
    bad = Sample.failed("k", "why")
    assert (bad.data, bad.size, bad.mtime_ns, bad.sha256) == (None, -1, -1, bytes(32))
