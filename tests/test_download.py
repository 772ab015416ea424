"""``robench data download`` against a local HTTP server on 127.0.0.1 (http.server in a thread,
Range support): full transfer, resume, truncated transfers, a server that ignores Range, wrong
checksums and sizes, malicious tar / zip members, no overwrite without --force, manual sets.
No other network is used."""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import threading
import zipfile
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from conftest import write_cifar10
from PIL import Image

from robench import registry
from robench.data import download as D  # noqa: N812
from robench.data import imagenet, load_dataset
from robench.data.corruptions import STANDARD_CORRUPTIONS
from robench.errors import RobenchError


# -- the local server ---------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    server: FixtureServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        srv = self.server
        rng = self.headers.get("Range")
        srv.requests.append((self.path, rng))
        if self.path in srv.redirects:  # like the HF hub's resolve/ -> CDN redirect
            self.send_response(302)
            self.send_header("Location", srv.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        if rng and not srv.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if srv.truncate:  # promise the whole body, send part of it, hang up
            srv.truncate -= 1
            self.wfile.write(body[:max(1, len(body) // 3)])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class FixtureServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.redirects: dict[str, str] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.truncate = 0  # the next N responses are cut short
        self.ignore_range = False

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


@pytest.fixture()
def server():
    srv = FixtureServer()
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


# -- fixture archives ---------------------------------------------------------------------------
def tar_bytes(files: dict[str, bytes], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def cifar_c_tar(top: str = "CIFAR-10-C", rows: int = 20) -> bytes:
    """The released CIFAR-10-C tar's shape: <top>/labels.npy + <top>/<corruption>.npy."""
    x = np.random.default_rng(1).integers(0, 256, (rows, 32, 32, 3), dtype=np.uint8)
    files = {f"{top}/labels.npy": npy(np.arange(rows) % 10)}
    files.update({f"{top}/{c}.npy": npy(x) for c in STANDARD_CORRUPTIONS})
    return tar_bytes(files)


def serve(server: FixtureServer, monkeypatch, name: str, data: bytes, top: str | None,
          filename: str = "archive.tar", **pins) -> D.Archive:
    """Serve ``data`` and point ``name``'s source at it (sha256 pinned unless ``pins`` say)."""
    path = f"/files/{filename}"
    server.files[path] = data
    pins = pins or {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    src = D.Archive((server.url(path),), filename, top=top, checksum_origin="test", **pins)
    monkeypatch.setitem(D.SOURCES, name, src)
    return src


def leftovers(folder: Path) -> list[str]:
    """Staging folders / partial files that must not survive a finished or refused install."""
    return sorted(p.name for p in folder.iterdir() if ".extract-" in p.name or ".old-" in p.name)


# -- transfers ----------------------------------------------------------------------------------
def test_download_verifies_installs_and_never_overwrites(tmp_path, server, monkeypatch):
    data = cifar_c_tar()
    serve(server, monkeypatch, "cifar10-c", data, "CIFAR-10-C")
    target, note = D.download("cifar10-c", tmp_path, progress=False)
    assert target == tmp_path / "CIFAR-10-C" and "sha256 verified" in note
    src = load_dataset("cifar-c", target, "cifar10-c", {"variant": "cifar10"})
    assert len(src) == 15 * 20
    assert not (tmp_path / D.WORK_DIR).exists() and leftovers(tmp_path) == []
    assert server.requests == [("/files/archive.tar", None)]

    with pytest.raises(RobenchError) as e:
        D.download("cifar10-c", tmp_path, progress=False)
    assert "already exists" in e.value.problem and "--force" in e.value.fix
    assert len(server.requests) == 1  # refused before any transfer

    (target / "marker").write_text("old copy")
    D.download("cifar10-c", tmp_path, force=True, progress=False)
    assert not (target / "marker").exists() and (target / "labels.npy").is_file()
    assert leftovers(tmp_path) == []


def test_partial_file_is_resumed_with_range(tmp_path, server, monkeypatch):
    data = cifar_c_tar()
    serve(server, monkeypatch, "cifar10-c", data, "CIFAR-10-C", filename="CIFAR-10-C.tar")
    work = tmp_path / D.WORK_DIR
    work.mkdir()
    (work / "CIFAR-10-C.tar.part").write_bytes(data[:100_000])
    D.download("cifar10-c", tmp_path, progress=False)
    assert server.requests == [("/files/CIFAR-10-C.tar", "bytes=100000-")]
    assert (tmp_path / "CIFAR-10-C" / "fog.npy").is_file()


def test_truncated_transfer_resumes_automatically(tmp_path, server, monkeypatch):
    data = cifar_c_tar()
    serve(server, monkeypatch, "cifar10-c", data, "CIFAR-10-C")
    server.truncate = 2
    D.download("cifar10-c", tmp_path, progress=False, retries=2)
    first = len(data) // 3
    second = first + (len(data) - first) // 3
    assert server.requests == [("/files/archive.tar", None),
                               ("/files/archive.tar", f"bytes={first}-"),
                               ("/files/archive.tar", f"bytes={second}-")]
    assert (tmp_path / "CIFAR-10-C" / "labels.npy").is_file()


def test_truncated_transfer_keeps_the_part_for_the_next_call(tmp_path, server, monkeypatch):
    data = cifar_c_tar()
    serve(server, monkeypatch, "cifar10-c", data, "CIFAR-10-C")
    server.truncate = 10
    with pytest.raises(RobenchError) as e:
        D.download("cifar10-c", tmp_path, progress=False, retries=1)
    assert "interrupted after" in e.value.problem and "connection closed early" in e.value.problem
    assert "resumes" in e.value.fix
    part = tmp_path / D.WORK_DIR / "archive.tar.part"
    have = part.stat().st_size
    assert 0 < have < len(data) and not (tmp_path / "CIFAR-10-C").exists()
    server.truncate = 0
    D.download("cifar10-c", tmp_path, progress=False)
    assert server.requests[-1] == ("/files/archive.tar", f"bytes={have}-")
    assert (tmp_path / "CIFAR-10-C" / "labels.npy").is_file()


def test_mirror_fallback_and_redirect_keep_the_range(tmp_path, server, monkeypatch):
    """First mirror 404s; the second redirects (as the HF hub does) and the resume's Range
    header survives the redirect."""
    data = cifar_c_tar()
    server.files["/cdn/CIFAR-10-C.tar"] = data
    server.redirects["/resolve/CIFAR-10-C.tar"] = server.url("/cdn/CIFAR-10-C.tar")
    src = D.Archive((server.url("/gone/CIFAR-10-C.tar"), server.url("/resolve/CIFAR-10-C.tar")),
                    "CIFAR-10-C.tar", sha256=hashlib.sha256(data).hexdigest(), size=len(data),
                    top="CIFAR-10-C")
    monkeypatch.setitem(D.SOURCES, "cifar10-c", src)
    work = tmp_path / D.WORK_DIR
    work.mkdir()
    (work / "CIFAR-10-C.tar.part").write_bytes(data[:5000])
    D.download("cifar10-c", tmp_path, progress=False)
    assert server.requests == [("/gone/CIFAR-10-C.tar", "bytes=5000-"),
                               ("/resolve/CIFAR-10-C.tar", "bytes=5000-"),
                               ("/cdn/CIFAR-10-C.tar", "bytes=5000-")]
    assert (tmp_path / "CIFAR-10-C" / "labels.npy").is_file()


def test_server_ignoring_range_restarts_from_zero(tmp_path, server, monkeypatch):
    data = cifar_c_tar()
    serve(server, monkeypatch, "cifar10-c", data, "CIFAR-10-C")
    server.ignore_range = True
    work = tmp_path / D.WORK_DIR
    work.mkdir()
    (work / "archive.tar.part").write_bytes(b"garbage from another file" * 100)
    D.download("cifar10-c", tmp_path, progress=False)
    assert server.requests[0][1] == "bytes=2500-"  # asked to resume, got the whole file
    assert (tmp_path / "CIFAR-10-C" / "labels.npy").is_file()


def test_wrong_checksum_is_refused_and_deleted(tmp_path, server, monkeypatch):
    data = cifar_c_tar()
    serve(server, monkeypatch, "cifar10-c", data, "CIFAR-10-C", sha256="0" * 64)
    with pytest.raises(RobenchError) as e:
        D.download("cifar10-c", tmp_path, progress=False)
    got = hashlib.sha256(data).hexdigest()
    assert f"sha256 of archive.tar is {got}, expected {'0' * 64}" in e.value.problem
    assert "the file was deleted" in e.value.problem and "re-run" in e.value.fix
    assert not (tmp_path / "CIFAR-10-C").exists()
    assert not any((tmp_path / D.WORK_DIR).iterdir())


def test_wrong_size_is_refused_before_the_transfer(tmp_path, server, monkeypatch):
    data = cifar_c_tar()
    serve(server, monkeypatch, "cifar10-c", data, "CIFAR-10-C",
          sha256=hashlib.sha256(data).hexdigest(), size=len(data) + 1)
    with pytest.raises(RobenchError) as e:
        D.download("cifar10-c", tmp_path, progress=False)
    assert f"offers {len(data)} bytes, but the pinned release is {len(data) + 1}" in \
        e.value.problem
    assert not (tmp_path / D.WORK_DIR / "archive.tar.part").exists()


def test_user_given_sha256_overrides_the_pin(tmp_path, server, monkeypatch):
    data = cifar_c_tar()
    serve(server, monkeypatch, "cifar10-c", data, "CIFAR-10-C", sha256="1" * 64, size=1)
    _, note = D.download("cifar10-c", tmp_path, progress=False,
                         sha256=hashlib.sha256(data).hexdigest().upper())
    assert "sha256 verified" in note


def test_md5_pinned_cifar10_gz_into_torchvision_layout(tmp_path, server, monkeypatch):
    src_dir = write_cifar10(tmp_path / "src", n_test=12, n_train=3)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(src_dir / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    data = buf.getvalue()
    serve(server, monkeypatch, "cifar10", data, None, filename="cifar-10-python.tar.gz",
          md5=hashlib.md5(data).hexdigest())
    target, note = D.download("cifar10", tmp_path / "data", progress=False)
    assert target == tmp_path / "data" / "cifar10" and note.startswith("md5 verified")
    assert len(load_dataset("cifar", target, "cifar10")) == 12
    with pytest.raises(RobenchError, match="already exists"):  # train split: same folder
        D.download("cifar10-train", tmp_path / "data", progress=False)


def test_v2_plain_tar_named_gz_installs_with_integer_folders(tmp_path, server, monkeypatch):
    top = "imagenetv2-matched-frequency-format-val"
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, "JPEG")
    files = {f"{top}/{k}/img{k}.jpeg": jpeg.getvalue() for k in (0, 1, 2, 10, 100, 999)}
    serve(server, monkeypatch, "imagenet-v2-matched-frequency", tar_bytes(files), top,
          filename="imagenetv2-matched-frequency.tar.gz")
    target, _ = D.download("imagenet-v2-matched-frequency", tmp_path, progress=False)
    assert target == tmp_path / top
    src = load_dataset("imagenet-v2", target, "v2")
    assert sorted(src.labels.tolist()) == [0, 1, 2, 10, 100, 999]


# -- malicious archives -------------------------------------------------------------------------
def _evil_tar(kind: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ok = tarfile.TarInfo("CIFAR-10-C/labels.npy")
        ok.size = 3
        tf.addfile(ok, io.BytesIO(b"abc"))
        info = tarfile.TarInfo({"traversal": "CIFAR-10-C/../../evil.txt",
                                "absolute": "/tmp/robench-evil-absolute.txt"}.get(kind,
                                                                                    "CIFAR-10-C/x"))
        if kind in ("traversal", "absolute"):
            info.size = 4
            tf.addfile(info, io.BytesIO(b"evil"))
            return buf.getvalue()
        info.type = {"symlink_abs": tarfile.SYMTYPE, "symlink_out": tarfile.SYMTYPE,
                     "hardlink_out": tarfile.LNKTYPE, "chardev": tarfile.CHRTYPE,
                     "blockdev": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}[kind]
        info.linkname = {"symlink_abs": "/etc/passwd", "symlink_out": "../../outside",
                         "hardlink_out": "../outside"}.get(kind, "")
        tf.addfile(info)
        if kind.startswith("symlink"):  # then write through the link
            w = tarfile.TarInfo("CIFAR-10-C/x/pwned")
            w.size = 4
            tf.addfile(w, io.BytesIO(b"evil"))
    return buf.getvalue()


@pytest.mark.parametrize(("kind", "needle"), [
    ("traversal", "climbs out of the destination with '..'"),
    ("absolute", "is an absolute path"),
    ("symlink_abs", "is a link to the absolute path /etc/passwd"),
    ("symlink_out", "is a link pointing outside (../../outside)"),
    ("hardlink_out", "climbs out of the destination"),
    ("chardev", "is a device file or FIFO"),
    ("blockdev", "is a device file or FIFO"),
    ("fifo", "is a device file or FIFO"),
])
def test_malicious_tar_is_refused_whole(tmp_path, server, monkeypatch, kind, needle):
    data_root = tmp_path / "deep" / "data"
    data_root.mkdir(parents=True)
    serve(server, monkeypatch, "cifar10-c", _evil_tar(kind), "CIFAR-10-C")
    with pytest.raises(RobenchError) as e:
        D.download("cifar10-c", data_root, progress=False)
    assert "refusing to extract archive.tar" in e.value.problem and needle in e.value.problem
    assert "nothing was extracted" in e.value.fix
    assert not (data_root / "CIFAR-10-C").exists() and leftovers(data_root) == []
    assert not (tmp_path / "deep" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert not Path("/tmp/robench-evil-absolute.txt").exists()


@pytest.mark.parametrize(("name", "needle"), [
    ("sketch/../../evil.txt", "climbs out"),
    ("/abs/evil.txt", "absolute path"),
    ("C:/evil.txt", "absolute path"),
])
def test_malicious_zip_is_refused(tmp_path, name, needle):
    archive = tmp_path / "ImageNet-Sketch.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("sketch/n01440764/ok.JPEG", b"x")
        zf.writestr(zipfile.ZipInfo(name), b"evil")
    with pytest.raises(RobenchError, match=re.escape(needle)):
        D.download("imagenet-sketch", tmp_path / "data", archive=archive, progress=False)
    assert not (tmp_path / "data" / "imagenet-sketch").exists()
    assert not (tmp_path / "evil.txt").exists() and archive.is_file()  # the user's file stays


def test_zip_symlink_member_is_refused(tmp_path):
    archive = tmp_path / "s.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        link = zipfile.ZipInfo("sketch/link")
        link.external_attr = (0o120777 << 16)
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(RobenchError, match="is a link or special file"):
        D.download("imagenet-sketch", tmp_path / "data", archive=archive, progress=False)


# -- manual datasets, local archives, what cannot be downloaded ---------------------------------
def test_manual_datasets_explain_the_steps(tmp_path):
    with pytest.raises(RobenchError) as e:
        D.download("imagenet", tmp_path, progress=False)
    assert "cannot be downloaded by robench" in e.value.problem and "image-net.org" in e.value.fix
    assert "ILSVRC2012_img_val.tar" in e.value.fix and str(tmp_path / "imagenet" / "val") in \
        e.value.fix
    with pytest.raises(RobenchError) as e:
        D.download("imagenet-sketch", tmp_path, progress=False)
    assert "Google Drive" in e.value.problem and "--archive ImageNet-Sketch.zip" in e.value.fix


def test_sketch_zip_installed_from_a_local_archive(tmp_path):
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, "JPEG")
    archive = tmp_path / "ImageNet-Sketch.zip"
    wnids = imagenet.imagenet_wnids()
    with zipfile.ZipFile(archive, "w") as zf:
        for w in wnids[:5]:
            zf.writestr(f"sketch/{w}/sketch_1.JPEG", jpeg.getvalue())
    target, note = D.download("imagenet-sketch", tmp_path / "data", archive=archive)
    assert target == tmp_path / "data" / "imagenet-sketch" and "no checksum pinned" in note
    src = load_dataset("imagenet-folder", target, "imagenet-sketch", {"nested": ["sketch"]})
    assert src.labels.tolist() == [0, 1, 2, 3, 4] and archive.is_file()


@pytest.mark.parametrize(("name", "needle"), [
    ("cifar10-subset-test", "ships with robench"),
    ("cifar10-subset-test-c", "generated from cifar10-subset-test on first use"),
    ("imagenet-rr", "Did you mean 'imagenet-r'"),
])
def test_nothing_to_download(tmp_path, name, needle):
    with pytest.raises(RobenchError, match=re.escape(needle)):
        D.download(name, tmp_path, progress=False)


def test_every_source_is_canonical_and_pinned():
    for name, src in D.SOURCES.items():
        assert name in registry.DATASETS
        if isinstance(src, D.Archive):
            assert src.sha256 or src.md5, name
            assert all(u.startswith("https://") for u in src.urls)
            assert not any("drive.google" in u for u in src.urls)
    assert D.SOURCES["imagenet-v2-matched-frequency"].urls[0].startswith(
        "https://huggingface.co/datasets/vaishaal/ImageNetV2/")
    assert "zenodo.org" in D.SOURCES["cifar100-c"].urls[0]
    assert "hendrycks" in D.SOURCES["imagenet-a"].urls[0]
    assert isinstance(D.SOURCES["imagenet"], D.Manual)


# -- the command line ---------------------------------------------------------------------------
def test_cli_download(tmp_path, server, monkeypatch, capsys):
    from robench.cli import main

    serve(server, monkeypatch, "cifar10-c", cifar_c_tar(), "CIFAR-10-C")
    monkeypatch.setitem(registry.DATASETS, "cifar10-c",
                        replace(registry.DATASETS["cifar10-c"], n_expected=300))
    rc = main(["data", "download", "cifar10-c", "--data-root", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"cifar10-c: installed at {tmp_path / 'CIFAR-10-C'} (sha256 verified" in out
    assert "300 samples (expected 300)" in out
    assert main(["data", "download", "cifar10-c", "--data-root", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["data", "download", "imagenet"]) == 2
    assert "ILSVRC2012_img_val.tar" in capsys.readouterr().err
    assert main(["data", "download"]) == 0
    listing = capsys.readouterr().out
    assert "imagenet-r" in listing and "manual" in listing


def _tar(tmp_path, entries) -> Path:
    """A tar of (name, kind, payload): kind 'file' (payload bytes) or 'link' (payload target)."""
    archive = tmp_path / "chain.tar"
    with tarfile.open(archive, "w") as tf:
        for name, kind, payload in entries:
            info = tarfile.TarInfo(name)
            if kind == "link":
                info.type, info.linkname = tarfile.SYMTYPE, payload
                tf.addfile(info)
            else:
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    return archive


@pytest.mark.parametrize(("entries", "needle"), [
    # each link looks harmless on its own; through the first, the second climbs three levels
    ([("sketch/a", "link", "."), ("sketch/a/a/b", "link", "../../.."),
      ("sketch/a/a/b/pwned", "file", b"evil")], "lies beneath the symbolic link 'sketch/a'"),
    # a link to a link that points out
    ([("sketch/x", "link", "y"), ("sketch/y", "link", "../.."), ("sketch/ok", "file", b"ok")],
     "'sketch/x' is a link pointing outside (y)"),
    ([("sketch/loop", "link", "loop"), ("sketch/ok", "file", b"ok")], "pointing outside"),
])
def test_link_chains_are_resolved_against_the_archive_tree(tmp_path, entries, needle):
    archive = _tar(tmp_path, entries)
    dest = tmp_path / "deep" / "stage"
    dest.mkdir(parents=True)
    with pytest.raises(RobenchError, match=re.escape(needle)):
        D.extract_safely(archive, dest)
    assert list(dest.iterdir()) == [] and not (tmp_path / "pwned").exists()
    assert not any(p.name == "pwned" for p in tmp_path.rglob("*"))


def test_a_link_inside_the_archive_is_still_extracted(tmp_path):
    archive = _tar(tmp_path, [("sketch/real/f.txt", "file", b"ok"),
                              ("sketch/alias", "link", "real")])
    dest = tmp_path / "stage"
    dest.mkdir()
    D.extract_safely(archive, dest)
    assert (dest / "sketch" / "alias" / "f.txt").read_bytes() == b"ok"


def test_truncated_archives_and_a_python_without_the_filter_are_named(tmp_path, monkeypatch):
    archive = _tar(tmp_path, [(f"sketch/f{i}.bin", "file", bytes(4096)) for i in range(8)])
    dest = tmp_path / "stage"
    dest.mkdir()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(archive.read_bytes()[:4096 * 3 + 700])
    with pytest.raises(RobenchError, match="cut.tar is truncated or damaged"):
        D.extract_safely(cut, dest)
    monkeypatch.delattr(tarfile, "data_filter")
    with pytest.raises(RobenchError, match="has no tarfile.data_filter") as e:
        D.extract_safely(archive, dest)
    assert "3.11.4+" in e.value.fix and list(dest.iterdir()) == []
