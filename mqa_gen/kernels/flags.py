"""Shared Numba compile flags."""

# Fast-math without 'nnan'/'ninf': masked attention scores and filtered logits use -inf, which
# LLVM may otherwise assume never occurs.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
