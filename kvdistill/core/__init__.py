"""What both stages need and neither owns: loading a model / tokenizer / config and their
fingerprints (`models`), capturing pre-RoPE K/V (`capture`), prompt rendering and segments
(`prompts`), and loading examples (`data`). `dump` and `train` import this; it imports
neither, nor the store."""
