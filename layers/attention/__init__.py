"""The softmax-attention mixer (`mixer`, kind "attention") and its config (`config`)."""
