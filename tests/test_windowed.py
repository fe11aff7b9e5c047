"""WindowedTextDataset: hand-checked token layouts with the byte tokenizer (byte b -> id b + 3)."""

import pytest
import torch
from torch.utils.data import DataLoader

from activation_cache import Document, WindowedTextDataset, WindowError, train_mask_for
from activation_cache.byte_tokenizer import byte_tokenizer

PAD, BOS = 0, 1


def ids(text: str) -> list[int]:
    return [b + 3 for b in text.encode()]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_layout_with_bos_hand_checked(tok):
    ds = WindowedTextDataset(["abcdefg", "hi", ""], tok, max_length=4)
    a, b, c, d, e, f, g = ids("abcdefg")
    h, i = ids("hi")
    assert ds.tokens.tolist() == [
        [BOS, a, b, c],
        [BOS, d, e, f],
        [BOS, g, PAD, PAD],  # last window of a document is padded
        [BOS, h, i, PAD],    # a new document starts a new window; "" gives none
    ]
    assert ds.attention_mask.int().tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
    assert ds.train_mask.int().tolist() == [[0, 1, 1, 1], [0, 1, 1, 1], [0, 1, 0, 0], [0, 1, 1, 0]]
    assert ds.doc_ids.tolist() == [0, 0, 0, 1]
    assert ds.num_tokens == 4 + 4 + 2 + 3
    assert ds.num_train_tokens == 3 + 3 + 1 + 2
    assert [doc.doc_id for doc in ds.documents] == ["0", "1", "2"]


def test_layout_without_bos(tok):
    ds = WindowedTextDataset(["abcdefg"], tok, max_length=4, prepend_bos=False)
    assert ds.tokens.tolist() == [ids("abcd"), ids("efg") + [PAD]]
    assert ds.train_mask.int().tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    sink = WindowedTextDataset(["abcdefg"], tok, max_length=4, prepend_bos=False,
                               exclude_first_positions=1)
    assert sink.train_mask.int().tolist() == [[0, 1, 1, 1], [0, 1, 1, 0]]


def test_bos_kept_and_extra_exclusions(tok):
    ds = WindowedTextDataset(["abcb"], tok, max_length=5, exclude_bos=False,
                             exclude_token_ids=ids("b"))
    assert ds.tokens.tolist() == [[BOS] + ids("abcb")]
    assert ds.train_mask.int().tolist() == [[1, 1, 0, 1, 0]]


def test_special_token_text_is_plain_text(tok):
    # A document may not forge a BOS: "<bos>" in the text is five bytes, not token 1.
    ds = WindowedTextDataset(["<bos>"], tok, max_length=8)
    assert ds.tokens[0].tolist() == [BOS] + ids("<bos>") + [PAD, PAD]
    assert ds.train_mask[0].int().tolist() == [0, 1, 1, 1, 1, 1, 0, 0]


def test_documents_and_dataloader(tok):
    docs = [Document("hamlet", "to be or not"), Document("lear", "nothing")]
    ds = WindowedTextDataset(docs, tok, max_length=6)
    assert [d.doc_id for d in ds.documents] == ["hamlet", "lear"]
    assert ds.doc_ids.tolist() == [0, 0, 0, 1, 1]  # 12 bytes -> 3 windows of 5; 7 -> 2
    batches = list(DataLoader(ds, batch_size=2))
    assert [b["tokens"].shape for b in batches] == [(2, 6), (2, 6), (1, 6)]
    assert batches[0]["tokens"].dtype == torch.int64
    assert batches[0]["attention_mask"].dtype == torch.bool
    assert batches[0]["train_mask"].dtype == torch.bool
    assert batches[1]["doc_id"].tolist() == [0, 1]
    # every real token of each document comes back, in order
    rebuilt = {0: [], 1: []}
    for row in range(len(ds)):
        item = ds[row]
        real = item["tokens"][item["attention_mask"]].tolist()[1:]
        rebuilt[int(item["doc_id"])] += real
    assert rebuilt == {0: ids("to be or not"), 1: ids("nothing")}


def test_no_text_gives_an_empty_dataset_of_the_right_shape(tok):
    for texts in ([], ["", ""]):
        ds = WindowedTextDataset(texts, tok, max_length=4)
        assert len(ds) == 0 and ds.tokens.shape == (0, 4) and ds.train_mask.shape == (0, 4)
        assert ds.doc_ids.shape == (0,) and ds.num_tokens == 0


def test_window_longer_than_context_is_refused(tok):
    with pytest.raises(WindowError, match="n_ctx=8"):
        WindowedTextDataset(["abc"], tok, max_length=9, n_ctx=8)
    assert len(WindowedTextDataset(["abc"], tok, max_length=8, n_ctx=8)) == 1


@pytest.mark.parametrize("bad", [1, 0, -3, 2.5, "4"])
def test_bad_window_length(tok, bad):
    with pytest.raises(WindowError, match="max_text_length"):
        WindowedTextDataset(["abc"], tok, max_length=bad)


def test_bad_inputs_name_the_argument(tok):
    with pytest.raises(WindowError, match=r"texts\[1\]"):
        WindowedTextDataset(["abc", 3], tok, max_length=4)
    with pytest.raises(WindowError, match=r"exclude_token_ids: .* got \['x', -1\]"):
        WindowedTextDataset(["abc"], tok, max_length=4, exclude_token_ids=["x", 5, -1])
    with pytest.raises(WindowError, match="tokenizer: expected a HuggingFace tokenizer"):
        WindowedTextDataset(["abc"], "gpt2", max_length=4)


def test_train_mask_for_hand_case():
    tokens = torch.tensor([[1, 5, 6, 1, 0], [7, 5, 8, 0, 0]])
    attn = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    m = train_mask_for(tokens, attn, bos_token_id=1, exclude_token_ids=[5])
    assert m.int().tolist() == [[0, 0, 1, 0, 0], [1, 0, 1, 0, 0]]
    m = train_mask_for(tokens, attn, bos_token_id=1, exclude_bos=False, exclude_first_positions=2)
    assert m.int().tolist() == [[0, 0, 1, 1, 0], [0, 0, 1, 0, 0]]


@pytest.mark.parametrize("max_length, prepend_bos", [(2, True), (5, True), (7, False), (1, False)])
def test_matches_a_plain_reference_on_random_documents(tok, max_length, prepend_bos):
    gen = torch.Generator().manual_seed(max_length)
    alphabet = "abcdefgh é\n"
    texts = ["".join(alphabet[i] for i in torch.randint(len(alphabet), (int(n),), generator=gen))
             for n in torch.randint(0, 30, (12,), generator=gen)]
    ds = WindowedTextDataset(texts, tok, max_length=max_length, prepend_bos=prepend_bos)
    rows, docs, lengths = [], [], []
    head = [BOS] if prepend_bos else []
    size = max_length - len(head)
    for d, text in enumerate(texts):
        toks = ids(text)
        for start in range(0, len(toks), size):
            chunk = head + toks[start:start + size]
            rows.append(chunk + [PAD] * (max_length - len(chunk)))
            docs.append(d)
            lengths.append(len(chunk))
    assert ds.tokens.tolist() == rows
    assert ds.doc_ids.tolist() == docs
    assert ds.attention_mask.tolist() == [[p < n for p in range(max_length)] for n in lengths]
