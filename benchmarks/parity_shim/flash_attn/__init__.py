# Stand-in for the flash_attn package, used only to run the official model beside ours in
# benchmarks/parity_official.py (torch SDPA; a per-sample loop for the varlen call).
import torch, torch.nn.functional as F
def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, **kw):  # [B,S,H,D]
    o = F.scaled_dot_product_attention(q.transpose(1,2), k.transpose(1,2), v.transpose(1,2), scale=softmax_scale)
    return o.transpose(1,2)
def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kw):  # [tot,H,D]
    outs = []
    for i in range(len(cu_seqlens_q)-1):
        qs = q[cu_seqlens_q[i]:cu_seqlens_q[i+1]]; ks = k[cu_seqlens_k[i]:cu_seqlens_k[i+1]]; vs = v[cu_seqlens_k[i]:cu_seqlens_k[i+1]]
        o = F.scaled_dot_product_attention(qs.transpose(0,1)[None], ks.transpose(0,1)[None], vs.transpose(0,1)[None])[0].transpose(0,1)
        outs.append(o)
    return torch.cat(outs, 0)
