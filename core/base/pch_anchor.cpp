// Anchor translation unit for the precompiled LibTorch header target (andyllm_torch_pch).
// It holds no code; targets that include torch reuse its precompiled <torch/torch.h>.
