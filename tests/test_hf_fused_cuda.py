"""TurboQuantCache's fused CUDA path (tq.cuda kernels behind model.generate)."""
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tq.hf  # noqa: E402
from tq.hf import TurboQuantCache  # noqa: E402


def _tiny_llama(device, dtype=torch.float32, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def test_bad_fused_options():
    with pytest.raises(ValueError, match="fused"):
        TurboQuantCache("K4V4", fused="yes")
    with pytest.raises(ValueError, match="capacity"):
        TurboQuantCache("K4V4", capacity=0)


def test_cpu_ignores_auto_and_rejects_forced_fusion():
    model = _tiny_llama("cpu")
    ids = torch.randint(0, 512, (1, 40))
    cache = TurboQuantCache(model.config, "K4V4", window=8, sinks=0)
    tq.hf.enable(model, cache)
    model(ids, past_key_values=cache)
    assert all(type(layer).__name__ == "TurboQuantLayer" for layer in cache.layers)
    cache = TurboQuantCache(model.config, "K4V4", window=8, sinks=0, fused=True)
    tq.hf.enable(model, cache)
    with pytest.raises(ValueError, match="not a CUDA device"):
        model(ids, past_key_values=cache)


def test_auto_fusion_says_why_not_on_cuda():
    """fused="auto" on a CUDA device with settings the kernels cannot take warns once, naming the cause."""
    model = _tiny_llama("cpu")
    cache = TurboQuantCache(model.config, "K4V4")          # default sinks=4: not fusable
    cache.layers.append(cache._make_layer(0))
    cache.layers.append(cache._make_layer(1))
    with pytest.warns(UserWarning, match="sink tokens"):
        cache._maybe_fuse(0, torch.device("cuda"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache._maybe_fuse(1, torch.device("cuda"))       # once per cache
    assert type(cache.layers[0]).__name__ == "TurboQuantLayer"
    with pytest.raises(ValueError, match="sink tokens"):
        forced = TurboQuantCache(model.config, "K4V4", fused=True)
        forced.layers.append(forced._make_layer(0))
        forced._maybe_fuse(0, torch.device("cuda"))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _decode_logits(model, cache, ids, steps, tokens=None):
    """Logits of a prefill and `steps` greedy decode steps; `tokens` [B, steps] forces the
    fed tokens (so two caches are compared on the same sequence even where argmax differs)."""
    out = model(ids, past_key_values=cache)
    logits = [out.logits[:, -1]]
    fed = []
    nxt = out.logits[:, -1:].argmax(-1)
    for i in range(steps):
        if tokens is not None:
            nxt = tokens[:, i:i + 1]
        fed.append(nxt)
        out = model(nxt, past_key_values=cache)
        logits.append(out.logits[:, -1])
        nxt = out.logits[:, -1:].argmax(-1)
    return torch.stack(logits, 1), torch.cat(fed, 1)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("preset", ["K4V4", "K3V2"])
def test_fused_matches_packed_torch_path(preset, monkeypatch):
    """Same cache maths through the fused kernels and through the torch packed path.

    The float32 kernel ("fma") must agree at float32 tolerance: that pins the
    semantics (same codes, window, scaling).  The default tensor-core kernel rounds
    the query, the centroids and the attention weights to fp16 (2**-11 relative);
    after two layers and 20 steps its logits may move by a few 1e-3.
    """
    from tq.hf.cuda_layer import FusedCudaLayer
    model = _tiny_llama("cuda")
    ids = torch.randint(0, 512, (2, 300), device="cuda")
    # The fused ring buffer holds the last 32 tokens, the new one included, when attention
    # runs.  The torch path compresses after attention, down to `window`, so window=31 with
    # block=1 attends over the same 32 full-precision tokens and the same compressed ones;
    # no centering, so both paths store identical codes and differ only in arithmetic.
    ref_cache = TurboQuantCache(model.config, preset, window=31, sinks=0, block=1, center_keys=False, fused=False)
    tq.hf.enable(model, ref_cache)
    ref, fed = _decode_logits(model, ref_cache, ids, 20)
    rels = {}
    for impl in ("fma", "auto"):
        monkeypatch.setattr(FusedCudaLayer, "impl", impl)
        cache = TurboQuantCache(model.config, preset, window=32, sinks=0, center_keys=False, fused=True, capacity=1024)
        tq.hf.enable(model, cache)
        got, _ = _decode_logits(model, cache, ids, 20, tokens=fed)
        assert all(type(layer).__name__ == "FusedCudaLayer" for layer in cache.layers)
        assert cache.get_seq_length() == 320
        rels[impl] = float((got - ref).norm() / ref.norm())
    assert rels["fma"] < 1e-4, rels
    assert rels["auto"] < 1e-2, rels
    # bytes: codes + fp16 norms for compressed tokens, the window in fp32, the key means
    bpt = cache.compressed_bytes_per_token()
    kb, vb = int(preset[1]), int(preset[3])
    assert bpt == 2 * 2 * (64 * (kb + vb) // 8 + 4)


@pytest.mark.gpu
@cuda
def test_generate_with_fused_cache_and_errors():
    model = _tiny_llama("cuda", torch.bfloat16)
    ids = torch.randint(0, 512, (1, 200), device="cuda")
    cache = TurboQuantCache(model.config, "K4V4", window=64, sinks=0, capacity=512)
    tq.hf.enable(model, cache)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=24, do_sample=False)
    assert out.shape == (1, 224)
    assert type(cache.layers[0]).__name__ == "FusedCudaLayer"
    assert 0 < cache.nbytes() < cache.fp16_nbytes()
    with pytest.raises(ValueError, match="capacity"):
        model.generate(out, past_key_values=cache, max_new_tokens=400, do_sample=False)
    forced = TurboQuantCache(model.config, "K4V4", sinks=4, fused=True)
    tq.hf.enable(model, forced)
    with pytest.raises(ValueError, match="sink"):
        model(ids, past_key_values=forced)


def _eager_greedy(model, cache, ids, new):
    """Greedy tokens step by step with explicit positions (what CudaGraphDecoder replays)."""
    b, t = ids.shape
    with torch.no_grad():
        pos = torch.arange(t, device=ids.device).expand(b, t)
        out = model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
        toks = [ids, out.logits[:, -1].argmax(-1, keepdim=True)]
        for i in range(new - 1):
            p = torch.full((b, 1), t + i, dtype=torch.long, device=ids.device)
            out = model(input_ids=toks[-1], position_ids=p, past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
            toks.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(toks, 1)


def test_graph_decoder_errors(monkeypatch):
    from transformers import DynamicCache, StaticCache

    from tq.hf import CudaGraphDecoder
    model = _tiny_llama("cpu")
    with pytest.raises(ValueError, match="max_length"):
        CudaGraphDecoder(model, DynamicCache(), max_length=0)
    with pytest.raises(ValueError, match="warmup"):
        CudaGraphDecoder(model, DynamicCache(), max_length=64, warmup=0)
    with pytest.raises(TypeError, match="DynamicCache cannot be replayed"):
        CudaGraphDecoder(model, DynamicCache(), max_length=64)
    with pytest.raises(TypeError, match="fused=False"):
        CudaGraphDecoder(model, TurboQuantCache(model.config, "K4V4", sinks=0, fused=False), max_length=64)
    with pytest.raises(TypeError, match="skip_layers"):
        CudaGraphDecoder(model, TurboQuantCache(model.config, "K4V4", sinks=0, skip_layers=[0]), max_length=64)
    with pytest.raises(ValueError, match="capacity 32 is below max_length 64"):
        CudaGraphDecoder(model, TurboQuantCache(model.config, "K4V4", sinks=0, capacity=32), max_length=64)
    with pytest.raises(TypeError, match="sink tokens"):  # sinks=4 (the default) has no fused kernel
        CudaGraphDecoder(model, TurboQuantCache(model.config, "K4V4", capacity=64), max_length=64)
    with pytest.raises(ValueError, match="max_cache_len 32 is below max_length 64"):
        CudaGraphDecoder(model, StaticCache(config=model.config, max_cache_len=32), max_length=64)
    import tq.hf.graphs
    monkeypatch.setattr(tq.hf.graphs, "fused_cuda_reason", lambda *a: None)  # as where CuPy is installed
    big = CudaGraphDecoder(model, TurboQuantCache(model.config, "K4V4", sinks=0), max_length=5000)
    with pytest.raises(ValueError, match=r"default capacity \(prompt 8 \+ 4096\) is below max_length 5000"):
        big.generate(torch.zeros(1, 8, dtype=torch.long), 8)
    with pytest.raises(ValueError, match=r"\[batch, prompt\]"):
        big.generate(torch.zeros(8, dtype=torch.long), 8)
    dec = CudaGraphDecoder(model, StaticCache(config=model.config, max_cache_len=64), max_length=64)
    with pytest.raises(ValueError, match="CUDA device"):
        dec.generate(torch.zeros(1, 8, dtype=torch.long), 8)
    if torch.cuda.is_available():
        for bad in (2, 8.0, True):
            with pytest.raises(ValueError, match="max_new_tokens"):
                dec.generate(torch.zeros(1, 8, dtype=torch.long, device="cuda"), bad)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kind", ["K4V4", "K3V2", "static"])
def test_graph_decoder_replays_the_eager_steps(kind, monkeypatch):
    """Replayed decode steps produce the tokens of the same steps run eagerly (same kernels:
    the fused layers planned for max_length in both), batch 2, crossing the window so the
    store kernel compresses during replays; the host mirror of the lengths follows the
    device's; and caches a graph cannot replay are refused by name."""
    from transformers import DynamicCache, StaticCache

    from tq.hf import CudaGraphDecoder
    from tq.hf.cuda_layer import FusedCudaLayer
    model = _tiny_llama("cuda")
    ids = torch.randint(0, 512, (2, 100), device="cuda")
    new, max_len = 60, 200

    def make():
        if kind == "static":
            tq.hf.disable(model)
            return StaticCache(config=model.config, max_cache_len=max_len)
        c = TurboQuantCache(model.config, kind, window=32, sinks=0, fused=True, capacity=max_len)
        tq.hf.enable(model, c)
        return c

    with monkeypatch.context() as m:
        m.setattr(FusedCudaLayer, "graph_max_len", max_len)
        ref = _eager_greedy(model, make(), ids, new)
    cache = make()
    dec = CudaGraphDecoder(model, cache, max_length=max_len)
    got = dec.generate(ids, new)
    assert dec.replays == new - 1 - dec.warmup
    assert got.shape == (2, 100 + new)
    assert torch.equal(got, ref), (got != ref).nonzero()[:5]
    if kind != "static":
        for layer in cache.layers:
            assert layer.fused.seq_lengths == layer.fused.lengths.tolist() == [100 + new - 1] * 2
        with pytest.raises(ValueError, match="exceed max_length"):
            CudaGraphDecoder(model, make(), max_length=max_len).generate(ids, max_len)
    tq.hf.disable(model)
    with pytest.raises(TypeError, match="DynamicCache cannot be replayed"):
        CudaGraphDecoder(model, DynamicCache(), max_length=max_len)
