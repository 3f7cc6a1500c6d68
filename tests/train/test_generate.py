"""train.sampling (distributions of greedy, temperature, top-k, top-p) and train.generate
(prompt checks, streaming text, cached decoding of a trained run, the command line)."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train.generate as gen
from train.artifacts import load_run
from train.data.tokenizer import ByteTokenizer, IdTokenizer, Tokenizer
from train.generate import Decoder, GenerateError, TextStream, encode_prompt, main
from train.sampling import SamplingSettings, describe, sample, top_k_filter, top_p_filter

DRAWS = 4000


@functools.lru_cache(maxsize=None)
def _sampler(settings):
    """jitted (keys [n, 2], logits [V]) -> ids [n]: one compile per setting and shape."""
    return jax.jit(jax.vmap(lambda key, logits: sample(key, logits[None], settings)[0], in_axes=(0, None)))


def draws(logits, settings, seed=0):
    """DRAWS independent samples of one row of logits [V] -> int [DRAWS]."""
    keys = jax.random.split(jax.random.PRNGKey(seed), DRAWS)
    return np.asarray(_sampler(settings)(keys, jnp.asarray(logits, jnp.float32)))


def frequencies(ids, vocab):
    return np.bincount(ids, minlength=vocab) / len(ids)


# ----------------------------------------------------------------------------- sampling

@pytest.mark.parametrize("kw, match", [
    (dict(temperature=-0.5), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=-0.1), "top_p"),
])
def test_bad_sampling_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingSettings(**kw)


def test_settings_describe_themselves():
    assert describe(SamplingSettings(0)) == "greedy (temperature 0)"
    assert describe(SamplingSettings(0.8, top_k=20, top_p=0.9)) == "temperature 0.8, top_k 20, top_p 0.9"
    assert describe(SamplingSettings(1.0)) == "temperature 1"


def test_temperature_zero_is_argmax_whatever_the_filters():
    logits = jax.random.normal(jax.random.PRNGKey(1), (5, 50))
    for s in (SamplingSettings(0.0), SamplingSettings(0.0, top_k=3, top_p=0.2)):
        for seed in range(3):
            got = sample(jax.random.PRNGKey(seed), logits, s)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(logits, -1)))


def test_temperature_sampling_follows_the_scaled_softmax():
    logits = np.array([0.0, 1.0, 2.0, -1.0], np.float32)
    for t in (0.5, 2.0):
        freq = frequencies(draws(logits, SamplingSettings(t)), 4)
        np.testing.assert_allclose(freq, np.asarray(jax.nn.softmax(logits / t)), atol=0.03)


def test_top_k_never_samples_outside_the_k_largest():
    logits = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (40,))) * 0.3  # nearly flat
    k = 5
    ids = draws(logits, SamplingSettings(1.0, top_k=k))
    top = set(np.argsort(-logits)[:k].tolist())
    assert set(ids.tolist()) == top  # only those, and each of them (a flat distribution)
    want = np.asarray(jax.nn.softmax(logits[sorted(top)]))
    np.testing.assert_allclose(frequencies(ids, 40)[sorted(top)], want, atol=0.03)


def test_top_k_with_ties_keeps_exactly_k_candidates():
    values, ids = top_k_filter(jnp.zeros((1, 10)), 3)
    assert values.shape == ids.shape == (1, 3)
    assert len(set(draws(np.zeros(10, np.float32), SamplingSettings(1.0, top_k=3)).tolist())) == 3


def test_top_p_keeps_the_smallest_prefix_reaching_the_mass():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs).astype(np.float32)
    kept = lambda p: np.isfinite(np.asarray(top_p_filter(jnp.asarray(logits)[None], p))[0]).sum()
    assert [kept(p) for p in (1e-6, 0.5, 0.75, 0.9, 0.97, 1.0)] == [1, 1, 2, 3, 4, 4]
    # sampling: with p = 0.75 only the first two, renormalised (0.5 / 0.8, 0.3 / 0.8)
    freq = frequencies(draws(logits[[2, 0, 3, 1]], SamplingSettings(1.0, top_p=0.75)), 4)  # unsorted input
    np.testing.assert_allclose(freq, [0, 0.625, 0, 0.375], atol=0.03)


def test_top_p_tiny_keeps_one_token_and_sampling_is_seeded():
    logits = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (30,)))
    assert set(draws(logits, SamplingSettings(1.0, top_p=1e-9)).tolist()) == {int(np.argmax(logits))}
    s = SamplingSettings(1.3, top_k=10, top_p=0.9)
    a, b, c = draws(logits, s, seed=5), draws(logits, s, seed=5), draws(logits, s, seed=6)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


# ----------------------------------------------------------------------------- prompts and text

def test_prompts_are_checked():
    with pytest.raises(GenerateError, match="empty"):
        encode_prompt(ByteTokenizer(), "", 256)
    with pytest.raises(GenerateError, match=r"outside the model's vocabulary \[0, 100\)"):
        encode_prompt(ByteTokenizer(), "é", 100)  # bytes 195, 169
    with pytest.raises(GenerateError, match="token ids separated by spaces"):
        encode_prompt(IdTokenizer(64), "hello there", 64)
    with pytest.raises(GenerateError, match=r"\[70\]"):
        encode_prompt(IdTokenizer(64), "3 70 5", 64)
    np.testing.assert_array_equal(encode_prompt(IdTokenizer(64), " 3 40\n5 ", 64), [3, 40, 5])


def test_byte_stream_prints_multibyte_characters_whole():
    text = "h€llo, wörld 🙂"
    data = text.encode()
    s = TextStream(ByteTokenizer(), list(data[:1]))
    pieces = [s.push(b) for b in data[1:]] + [s.flush()]
    assert s.prompt_text + "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[:3] == ["", "", "€"]  # three bytes, printed once complete
    s = TextStream(ByteTokenizer(), [104])
    assert s.push(0xFF) == "\ufffd" and s.push(0xE2) == "" and s.flush() == "\ufffd"  # invalid bytes show


class _SentencePieceLike(Tokenizer):
    """Decodes like SentencePiece: byte pieces, and the leading space of a text dropped."""
    kind = "fake"
    PIECES = {0: b" hello", 1: b" world", 2: b"\xc3", 3: b"\xa9", 4: b"!"}
    vocab_size = len(PIECES)

    def decode(self, ids):
        return b"".join(self.PIECES[int(i)] for i in ids).decode("utf-8", "replace").lstrip(" ")


def test_stream_of_other_tokenizers_prints_new_suffixes():
    s = TextStream(_SentencePieceLike(), [0])
    assert s.prompt_text == "hello"
    assert [s.push(i) for i in (1, 2, 3, 4)] == [" world", "", "é", "!"]  # space kept; é held until whole
    assert s.flush() == ""
    ids = TextStream(IdTokenizer(64), [3, 40])
    assert ids.prompt_text == "3 40" and ids.push(7) == " 7" and ids.push(12) == " 12"


# ----------------------------------------------------------------------------- a trained run

@pytest.fixture(scope="module")
def loaded(text_run_dir):
    return load_run(text_run_dir)


def full_forward(model, tokens):
    """Logits [T, V] of one sequence, no cache."""
    t = jnp.asarray(tokens, jnp.int32)[None]
    logits, _ = model(t, positions=jnp.arange(t.shape[1], dtype=jnp.int32)[None], segment_ids=jnp.ones_like(t))
    return np.asarray(logits[0])


PROMPT = "def main(argv):\n    "  # 20 tokens; + 30 new = 50 <= seq_len 64, > window 16


def test_sampling_is_reproducible_and_stays_in_the_top_k(loaded):
    prompt = loaded.tokenizer.encode(PROMPT)
    dec = Decoder(loaded.model, SamplingSettings(1.5, top_k=4))
    a = np.concatenate(list(dec.generate(prompt, 30, seed=7)))
    np.testing.assert_array_equal(a, np.concatenate(list(dec.generate(prompt, 30, seed=7))))
    assert (a != np.concatenate(list(dec.generate(prompt, 30, seed=8)))).any()
    assert dec._prefill._cache_size() == dec._step._cache_size() == 1  # compiled once, not per token
    logits = full_forward(loaded.model, np.concatenate([prompt, a[:-1]]))[len(prompt) - 1:]
    top4 = np.argsort(-logits, axis=-1)[:, :4]
    assert all(t in row for t, row in zip(a, top4))


def test_cli_streams_the_greedy_argmax_of_the_full_forward(text_run_dir, loaded, capsys, monkeypatch):
    """Greedy decoding through the caches (prefill, then steps past the sliding window) picks
    the argmax of the uncached forward pass at every step, and the text streams token by token."""
    writes, ids = [], []
    real_write, real_push = gen._write, TextStream.push
    monkeypatch.setattr(gen, "_write", lambda text: (writes.append(text), real_write(text)))
    monkeypatch.setattr(TextStream, "push", lambda self, i: (ids.append(int(i)), real_push(self, i))[1])
    rc = main([str(text_run_dir), "--prompt", PROMPT, "--max-tokens", "30", "--temperature", "0"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    for part in ("checkpoint step 30", "prompt 20 tokens + 30 new", "greedy", "seed 0", "steps/s"):
        assert part in err, (part, err)
    assert len(writes) == 1 + 30 + 1  # the prompt, one write per token as it arrives, the end
    assert out.startswith(PROMPT) and out == "".join(writes)
    assert len(ids) == 30
    prompt = loaded.tokenizer.encode(PROMPT)
    logits = full_forward(loaded.model, np.concatenate([prompt, ids[:-1]]))
    np.testing.assert_array_equal(logits[len(prompt) - 1:].argmax(-1), ids)


@pytest.mark.slow
def test_cli_samples_a_batch_from_an_older_checkpoint(text_run_dir, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("class A:\n")
    rc = main([str(text_run_dir), "--prompt-file", str(tmp_path / "p.txt"), "--num-samples", "3",
               "--max-tokens", "12", "--step", "15", "--no-echo"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "checkpoint step 15" in err and "3 samples" in err
    assert [line for line in out.splitlines() if line.startswith("--- sample")] == \
        ["--- sample 1 ---", "--- sample 2 ---", "--- sample 3 ---"]
    assert "class A:" not in out


@pytest.mark.parametrize("args, match", [
    (["--prompt", "x", "--temperature", "-1"], "temperature must be"),
    (["--prompt", "x", "--top-p", "0"], r"top_p must be in \(0, 1\]"),
    (["--prompt", "x", "--top-p", "1.5"], r"top_p must be in \(0, 1\]"),
    (["--prompt", "x", "--top-k", "0"], "top_k must be"),
    (["--prompt", "x", "--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["--prompt", "x", "--num-samples", "0"], "--num-samples must be >= 1"),
    (["--prompt", ""], "prompt is empty"),
    (["--prompt-file", "/nonexistent/p.txt"], "no such file"),
    (["--prompt", "x", "--step", "7"], r"checkpoints at steps \[15, 30\]"),
])
def test_cli_errors_are_one_line(text_run_dir, capsys, args, match):
    assert main([str(text_run_dir), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert re.search(match, err), err


def test_cli_on_a_missing_run_dir(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_mqar_prompts_are_token_ids(mqar_run_dir, capsys):
    rc = main([str(mqar_run_dir), "--prompt", "3 40 5 50 3", "--max-tokens", "4", "--temperature", "0"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert re.fullmatch(r"3 40 5 50 3( \d+){4}\n", out), out
    assert main([str(mqar_run_dir), "--prompt", "3 400"]) == 2
    assert "outside the model's vocabulary [0, 64)" in capsys.readouterr().err
