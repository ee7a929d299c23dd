"""llama.cpp on a GGUF file, for `sage bench infer`: prefill tokens/s, greedy decode tokens/s at
each batch size, and the perplexity of a fixed token sequence, with the same token ids and thread
count sage uses. Reads a JSON request on stdin, prints one JSON object.

Request: {"model": path, "threads": n, "prompt": [ids], "ppl": [ids], "decode_tokens": n,
          "decode_prompt": [ids], "batches": [1, 16], "repeats": n}
Needs llama-cpp-python (pip install llama-cpp-python: it builds llama.cpp for this CPU) and numpy.
"""

import json
import sys
import time

import numpy as np
import llama_cpp as L


def main():
    req = json.load(sys.stdin)
    threads = int(req["threads"])
    L.llama_backend_init()
    mparams = L.llama_model_default_params()
    load = getattr(L, "llama_model_load_from_file", None) or L.llama_load_model_from_file
    model = load(req["model"].encode(), mparams)
    if not model:
        raise SystemExit(f"llama.cpp could not load {req['model']}")
    vocab_of = getattr(L, "llama_model_get_vocab", None)
    n_vocab = L.llama_vocab_n_tokens(vocab_of(model)) if vocab_of else L.llama_n_vocab(model)
    max_batch = max(req["batches"])
    n_ctx = max(len(req["prompt"]), len(req["ppl"]), len(req["decode_prompt"]) + req["decode_tokens"]) + 8
    cparams = L.llama_context_default_params()
    cparams.n_ctx = n_ctx * max_batch
    cparams.n_batch = max(len(req["prompt"]), len(req["ppl"]), max_batch * len(req["decode_prompt"]))
    cparams.n_ubatch = cparams.n_batch
    cparams.n_seq_max = max_batch
    cparams.n_threads = threads
    cparams.n_threads_batch = threads
    new_ctx = getattr(L, "llama_init_from_model", None) or L.llama_new_context_with_model
    ctx = new_ctx(model, cparams)
    batch = L.llama_batch_init(cparams.n_batch, 0, max_batch)

    def clear():
        if hasattr(L, "llama_get_memory"):
            L.llama_memory_clear(L.llama_get_memory(ctx), True)
        else:
            L.llama_kv_self_clear(ctx)

    def run(items):
        """items: (token, pos, seq, want_logits)"""
        batch.n_tokens = len(items)
        for i, (tok, pos, seq, want) in enumerate(items):
            batch.token[i] = tok
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = 1 if want else 0
        rc = L.llama_decode(ctx, batch)
        if rc != 0:
            raise SystemExit(f"llama_decode failed ({rc})")

    def logits(i):
        return np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,))

    out = {"llama_cpp_python": L.__version__, "threads": threads, "system_info": L.llama_print_system_info().decode()}

    # Perplexity of the fixed sequence: every position's next-token log-probability.
    ids = req["ppl"]
    clear()
    run([(t, p, 0, True) for p, t in enumerate(ids)])
    nll = 0.0
    for p in range(len(ids) - 1):
        z = logits(p).astype(np.float64)
        m = z.max()
        nll += m + np.log(np.exp(z - m).sum()) - z[ids[p + 1]]
    out["ppl"] = float(np.exp(nll / (len(ids) - 1)))

    # Prefill: the prompt in one batch, median of repeats.
    times = []
    for _ in range(req["repeats"]):
        clear()
        t = time.perf_counter()
        run([(tok, p, 0, p == len(req["prompt"]) - 1) for p, tok in enumerate(req["prompt"])])
        times.append(time.perf_counter() - t)
    out["prefill_tokens_per_second"] = len(req["prompt"]) / float(np.median(times))

    # Greedy decode: B copies of the prompt, then one step per token for all B sequences.
    out["decode_tokens_per_second"] = {}
    dp = req["decode_prompt"]
    for b in req["batches"]:
        clear()
        run([(tok, p, s, p == len(dp) - 1) for s in range(b) for p, tok in enumerate(dp)])
        nxt = [int(np.argmax(logits(s * len(dp) + len(dp) - 1))) for s in range(b)]
        t = time.perf_counter()
        for step in range(req["decode_tokens"]):
            run([(nxt[s], len(dp) + step, s, True) for s in range(b)])
            nxt = [int(np.argmax(logits(s))) for s in range(b)]
        out["decode_tokens_per_second"][str(b)] = b * req["decode_tokens"] / (time.perf_counter() - t)

    L.llama_batch_free(batch)
    L.llama_free(ctx)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
