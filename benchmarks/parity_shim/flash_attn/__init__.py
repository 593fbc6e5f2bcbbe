# Stand-in for the flash_attn package, used only to run the official model beside ours in
# benchmarks/parity_official.py and benchmarks/bench_official.py (torch SDPA; the varlen call is one
# batched SDPA when every sequence has the same length, else a per-sample loop).
import torch, torch.nn.functional as F
def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, **kw):  # [B,S,H,D]
    o = F.scaled_dot_product_attention(q.transpose(1,2), k.transpose(1,2), v.transpose(1,2), scale=softmax_scale)
    return o.transpose(1,2)
def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None, **kw):  # [tot,H,D]
    n = len(cu_seqlens_q) - 1
    if q.shape[0] == n * max_seqlen_q and k.shape[0] == n * max_seqlen_k:
        # every length equals its maximum (the official DiT with text_tokens_zero_pad): one call, no host sync
        o = F.scaled_dot_product_attention(q.view(n, max_seqlen_q, *q.shape[1:]).transpose(1,2),
                                           k.view(n, max_seqlen_k, *k.shape[1:]).transpose(1,2),
                                           v.view(n, max_seqlen_k, *v.shape[1:]).transpose(1,2), scale=softmax_scale)
        return o.transpose(1,2).reshape(q.shape[0], q.shape[1], -1)
    outs = []
    for i in range(n):
        qs = q[cu_seqlens_q[i]:cu_seqlens_q[i+1]]; ks = k[cu_seqlens_k[i]:cu_seqlens_k[i+1]]; vs = v[cu_seqlens_k[i]:cu_seqlens_k[i+1]]
        o = F.scaled_dot_product_attention(qs.transpose(0,1)[None], ks.transpose(0,1)[None], vs.transpose(0,1)[None], scale=softmax_scale)[0].transpose(0,1)
        outs.append(o)
    return torch.cat(outs, 0)
