"""The models: BERT (post-/pre-LN, absolute or rotary positions, `bert.py`), routing and the MoE FFN
(`routing.py`, `moe.py`, one file per expert backend in `experts/`), and the Hugging Face-style
export and its remote code (`hf.py`, `hf_remote.py`)."""
