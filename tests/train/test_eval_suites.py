"""train.evals: the suite registry and `python -m train.eval --suite`, and the mqar, niah and
length suites on constructed cases with known answers (oracles score 1, untrained or barely
trained models score near chance, length buckets add up to the plain eval)."""
import json
import re

import jax
import numpy as np
import pytest

from train.artifacts import load_run
from train.config import ConfigError, MQARConfig
from train.data.tokenizer import ByteTokenizer
from train.eval import main
from train.evals import SUITES, parse_suites, record_path
from train.evals import length, mqar, niah
from train.evals.common import cache_nbytes, greedy_generator
from train.generate import Decoder
from train.sampling import SamplingSettings

RECORD_KEYS = {"suite", "step", "seed", "elapsed_s", "results", "summary"}


@pytest.fixture(scope="module")
def text_run(text_run_dir):
    return load_run(text_run_dir)


@pytest.fixture(scope="module")
def mqar_run(mqar_run_dir):
    return load_run(mqar_run_dir)


# ----------------------------------------------------------------------------- registry and CLI

def test_parse_suites_keeps_order_drops_repeats_and_names_the_accepted():
    assert parse_suites("niah,length,niah") == ["niah", "length"]
    assert parse_suites(["mqar", "diagnostics"]) == ["mqar", "diagnostics"]
    assert set(SUITES) == {"mqar", "niah", "length", "diagnostics"}
    for bad in ("bogus", "niah,", ""):
        with pytest.raises(ConfigError, match="accepted: mqar, niah, length, diagnostics"):
            parse_suites(bad)


def test_cli_unknown_suite_exits_2_naming_the_accepted(tmp_path, capsys):
    assert main([str(tmp_path), "--suite", "bogus"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown suite 'bogus'" in err
    assert "mqar, niah, length, diagnostics" in err


@pytest.mark.parametrize("args, match", [
    (["--suite", "niah", "data.seq_len=32"], "--suite takes no data.* overrides"),
    (["--suite", "length", "--batches", "2"], "--suite takes no --batches"),
    (["--seed", "3"], "--seed applies to --suite only"),
])
def test_cli_refuses_options_of_the_other_mode(mqar_run_dir, capsys, args, match):
    assert main([str(mqar_run_dir), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err


@pytest.mark.parametrize("which, suite, match", [
    ("mqar", "niah", "needs a model trained on text"),
    ("mqar", "length", "needs a model trained on text"),
    ("text", "mqar", "needs a model trained on data.source=mqar"),
])
def test_cli_inapplicable_suite_exits_2_with_one_line(mqar_run_dir, text_run_dir, capsys, which, suite, match):
    run_dir = mqar_run_dir if which == "mqar" else text_run_dir
    assert main([str(run_dir), "--suite", f"{suite}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and match in err, err


def test_cli_runs_a_suite_and_writes_the_record_where_documented(mqar_run_dir, capsys):
    assert main([str(mqar_run_dir), "--suite", "mqar", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    path = mqar_run_dir / "eval" / "suite-mqar-step0.json"
    assert path == record_path(mqar_run_dir, "mqar", 0)
    assert f"wrote {path}" in out and re.search(r"mqar \(step 0, seed 1, [\d.]+ s\)", out), out
    record = json.loads(path.read_text())
    assert set(record) == RECORD_KEYS and record["suite"] == "mqar" and record["seed"] == 1
    assert all(isinstance(v, float) for v in record["summary"].values())
    assert {"mqar/acc_mean", "mqar/acc_mean_all", "mqar/acc@kv4_T32", "mqar/acc@kv16_T64"} <= set(record["summary"])
    assert not list(path.parent.glob("*.tmp"))  # written atomically: no temp file left behind


# ----------------------------------------------------------------------------- mqar

def test_mqar_default_grid_keeps_only_buildable_cells():
    assert mqar.default_grid(MQARConfig(vocab_size=64, num_kv_pairs=4), 32) == [
        (2, 32), (4, 32), (8, 32), (2, 64), (4, 64), (8, 64), (16, 64)]
    # the mqar preset: every cell fits (T >= 4 kv, V >= 4 kv)
    assert len(mqar.default_grid(MQARConfig(vocab_size=512, num_kv_pairs=8), 128)) == 8


def _recall_oracle(known_pairs: int):
    """Predicts from the inputs alone: at a query key, the value that followed that key in the
    context, for the first `known_pairs` pairs of each row; 0 (never a value) otherwise."""
    def predict(batch):
        pred = np.zeros_like(batch["inputs"])
        for r, row in enumerate(batch["inputs"]):
            n = int(batch["loss_mask"][r].sum())
            table = {int(row[2 * i]): int(row[2 * i + 1]) for i in range(min(known_pairs, n))}
            for t in range(2 * n, len(row)):
                pred[r, t] = table.get(int(row[t]), 0)
        return pred
    return predict


def test_mqar_scores_answer_positions_only_hand_checked():
    cfg = MQARConfig(vocab_size=32, num_kv_pairs=4)
    batch = mqar.cell_examples(cfg, 4, 24, num=7, seed=0)
    assert batch["inputs"].shape == (7, 24) and batch["loss_mask"].sum() == 7 * 4
    answers = batch["targets"][batch["loss_mask"] > 0]
    assert ((answers >= 16) & (answers < 32)).all()  # every scored target is a value
    # 3 rows per call: the last call is padded, and the padding is not scored
    assert mqar.score_cell(_recall_oracle(4), batch, rows=3) == (28, 28)
    assert mqar.score_cell(_recall_oracle(2), batch, rows=3) == (14, 28)  # half the keys known
    assert mqar.score_cell(lambda b: b["targets"] * 0, batch, rows=7) == (0, 28)
    # another seed draws other validation examples; the same seed the same ones
    assert not np.array_equal(mqar.cell_examples(cfg, 4, 24, 7, seed=1)["inputs"], batch["inputs"])
    np.testing.assert_array_equal(mqar.cell_examples(cfg, 4, 24, 7, seed=0)["inputs"], batch["inputs"])


def test_mqar_suite_oracle_is_perfect_and_untrained_model_near_chance(mqar_run):
    grid = [(2, 32), (4, 32), (8, 64)]
    perfect = mqar.run(mqar_run, grid=grid, num_examples=16, predict=_recall_oracle(99))
    assert perfect["summary"] == {"mqar/acc@kv2_T32": 1.0, "mqar/acc@kv4_T32": 1.0, "mqar/acc@kv8_T64": 1.0,
                                  "mqar/acc_mean": 1.0, "mqar/acc_mean_all": 1.0}
    rec = mqar.run(mqar_run, grid=grid, num_examples=16)
    assert set(rec) == RECORD_KEYS
    cells = rec["results"]["cells"]
    assert [(c["num_kv_pairs"], c["seq_len"], c["answers"], c["trained_len"]) for c in cells] == [
        (2, 32, 32, True), (4, 32, 64, True), (8, 64, 128, False)]
    # 32 possible values: an untrained model is near 1/32, far below 0.5
    assert rec["summary"]["mqar/acc_mean_all"] < 0.2
    np.testing.assert_allclose(rec["summary"]["mqar/acc_mean"], (cells[0]["accuracy"] + cells[1]["accuracy"]) / 2)


# ----------------------------------------------------------------------------- niah

def test_splice_puts_needles_at_their_depths():
    filler = np.arange(100, 110)
    out = niah.splice(filler, [(np.array([1, 1]), 0.0), (np.array([2]), 1.0), (np.array([3]), 0.5)], np.array([9]))
    assert out.tolist() == [1, 1, 100, 101, 102, 103, 104, 3, 105, 106, 107, 108, 109, 2, 9]


def test_score_answers_needs_the_exact_value():
    tok = ByteTokenizer()
    gen = [tok.encode(s) for s in (" 71432.", "71432\n", " 714321", " 7143.", " 71433", "  71432")]
    assert niah.score_answers(tok, gen, ["71432"] * 6).tolist() == [True, True, False, False, False, True]


def _needle_oracle(tok):
    """Reads the prompt: the question ends in the needle's own words ("... The pass key is"),
    so the value is whatever follows those words earlier in the prompt."""
    def generate(prompts, max_new):
        out = np.zeros((len(prompts), max_new), np.int32)
        for i, p in enumerate(prompts):
            text = tok.decode(p)
            lead = text.rsplit("? ", 1)[1]
            value = re.search(re.escape(lead) + r" (\d+)", text).group(1)
            ids = tok.encode(f" {value}.")[:max_new]
            out[i, :len(ids)] = ids
        return out
    return generate


def test_niah_trials_are_deterministic_and_exactly_context_long():
    tok = ByteTokenizer()
    pool = tok.encode("def f(x):\n    return x + 1\n" * 200)
    a, skipped = niah.make_trials(tok, pool, [64, 160], niah.DEPTHS, 2, seed=0)
    b, _ = niah.make_trials(tok, pool, [64, 160], niah.DEPTHS, 2, seed=0)
    c, _ = niah.make_trials(tok, pool, [64, 160], niah.DEPTHS, 2, seed=1)
    assert {(s["task"], s["context_len"]) for s in skipped} == {(t, 64) for t in niah.TASKS}  # too short
    assert len(a) == 3 * 5 * 2 and all(len(t.prompt) == t.context_len == 160 for t in a)
    assert all(np.array_equal(x.prompt, y.prompt) for x, y in zip(a, b))
    assert not all(np.array_equal(x.prompt, y.prompt) for x, y in zip(a, c))
    first = next(t for t in a if t.task == "passkey" and t.depth == 0.0)
    last = next(t for t in a if t.task == "needle" and t.depth == 1.0)
    assert tok.decode(first.prompt).startswith(f"\nThe pass key is {first.value}.")
    assert tok.decode(last.prompt).endswith(f"The magic number is {last.value}.\n\n"
                                            "What is the magic number? The magic number is")


def test_niah_oracle_scores_one_and_a_barely_trained_model_near_zero(text_run):
    lengths = [144, 160]
    rec = niah.run(text_run, lengths=lengths, trials=2, generate=_needle_oracle(text_run.tokenizer))
    assert set(rec) == RECORD_KEYS
    grid = rec["results"]["grid"]
    assert len(grid) == 3 * 2 * 5 and rec["results"]["skipped"] == []
    assert {(c["task"], c["context_len"], c["depth"]) for c in grid} == {
        (t, L, d) for t in niah.TASKS for L in lengths for d in niah.DEPTHS}
    assert all(c["correct"] == c["trials"] == 2 for c in grid)
    assert set(rec["summary"].values()) == {1.0}
    assert {"niah/passkey_acc", "niah/needle_acc", "niah/phonebook_acc", "niah/acc_mean",
            "niah/phonebook_acc@160"} <= set(rec["summary"])
    # The run (seq_len 64, 30 steps on code) by default: T/2 and T cannot hold the needles, and
    # 2T = 128 bytes only passkey and needle, not a phonebook of three.
    rec = niah.run(text_run, trials=1)
    assert {(s["task"], s["context_len"]) for s in rec["results"]["skipped"]} == {
        (t, L) for t in niah.TASKS for L in (32, 64)} | {("phonebook", 128)}
    assert {(c["task"], c["context_len"]) for c in rec["results"]["grid"]} == {("passkey", 128), ("needle", 128)}
    assert rec["summary"]["niah/acc_mean"] <= 0.1
    assert "niah/phonebook_acc" not in rec["summary"]  # nothing measured: left out, not NaN


@pytest.mark.slow  # ~11 s: two decoders compiled; the niah and length tests use the generator by default
def test_greedy_generator_equals_the_decoder(text_run):
    """Chunked prefill (one whole chunk of 128 + a remainder of 22) and the scanned steps give
    the tokens of train.generate's Decoder at temperature 0 (window 16: the ring buffers wrap)."""
    prompts = np.random.default_rng(0).integers(32, 127, (2, 150)).astype(np.int32)
    got = greedy_generator(text_run.model)(prompts, 5)
    dec = Decoder(text_run.model, SamplingSettings(temperature=0.0))
    for row, g in zip(prompts, got):
        want = np.concatenate(list(dec.generate(row, 5)))
        np.testing.assert_array_equal(g, want)


# ----------------------------------------------------------------------------- length

def test_length_buckets_add_up_to_the_plain_eval(text_run, text_run_dir):
    rec = length.run(text_run, factors=(1,), decode_tokens=6)
    (one,) = rec["results"]["lengths"]
    # the loop's final eval, which `python -m train.eval RUN` reproduces (tests/train/test_eval.py)
    plain = json.loads((text_run_dir / "summary.json").read_text())["eval"]
    assert one["seq_len"] == 64 and one["rows"] == 2 * 4
    assert [(b["start"], b["end"]) for b in one["buckets"]] == [(8 * j, 8 * j + 8) for j in range(8)]
    tokens = np.array([b["tokens"] for b in one["buckets"]])
    losses = np.array([b["loss"] for b in one["buckets"]])
    assert tokens.sum() == one["tokens"] == plain["tokens"]
    np.testing.assert_allclose((tokens * losses).sum() / tokens.sum(), plain["loss"], rtol=1e-5)
    np.testing.assert_allclose(one["loss"], plain["loss"], rtol=1e-5)
    np.testing.assert_allclose(one["bits_per_byte"], plain["bits_per_byte"], rtol=1e-5)
    s = rec["summary"]
    assert set(s) == {f"length/{m}@1x" for m in ("loss", "bpb", "bpb_last", "decode_tok_s", "cache_bytes")}
    assert s["length/decode_tok_s@1x"] > 0 and s["length/bpb@1x"] == one["bits_per_byte"]
    # cache bytes from shapes equal the allocated cache; only the full-attention layer grows
    # (the three sliding-window layers keep 16 slots)
    allocated = sum(a.nbytes for a in jax.tree.leaves(text_run.model.init_cache(1, 64)))
    assert s["length/cache_bytes@1x"] == allocated == cache_nbytes(text_run.model, 1, 64)
    assert allocated < cache_nbytes(text_run.model, 1, 128) < 2 * allocated


def test_length_data_halves_rows_as_rows_double():
    from train.config import DataConfig
    d = DataConfig(seq_len=64, batch_size=4)
    assert [(length.length_data(d, k).seq_len, length.length_data(d, k).batch_size) for k in (1, 2, 4, 8)] == [
        (64, 4), (128, 2), (256, 1), (512, 1)]
    assert length.bucket_edges(10, 4) == [0, 3, 5, 8, 10]


@pytest.mark.slow
def test_cli_runs_niah_and_length_on_a_text_run(text_run_dir, capsys):
    assert main([str(text_run_dir), "--suite", "niah,length"]) == 0
    out = capsys.readouterr().out
    for name in ("niah", "length"):
        path = text_run_dir / "eval" / f"suite-{name}-step30.json"
        assert f"wrote {path}" in out
        record = json.loads(path.read_text())
        assert set(record) == RECORD_KEYS and record["step"] == 30
    lengths = json.loads((text_run_dir / "eval" / "suite-length-step30.json").read_text())["results"]["lengths"]
    assert [(e["factor"], e["seq_len"], e["rows"]) for e in lengths] == [(1, 64, 8), (2, 128, 4), (4, 256, 2)]
    assert all(e["decode_tok_s"] > 0 and len(e["buckets"]) == 8 for e in lengths)
