"""FastComposer (Xiao et al.): a CLIP image embedding fused into the class word, delayed subject conditioning."""
