"""Varied prompts for token-identity tests (short, long, code, lists, chat-like)."""

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
    "List three fruits that are red:",
    "In 1969, the first humans",
    "The quick brown fox",
    "Photosynthesis is the process by which",
    "SELECT name FROM users WHERE",
    "To make a cup of tea, first",
    "The largest planet in the solar system is",
    "Translate to French: Good morning ->",
    "Q: What is 12 times 12?\nA:",
    "import numpy as np\narr = np.",
    "The mitochondria is",
    "Dear hiring manager,",
    "A haiku about autumn:\n",
    "The Pythagorean theorem states that",
    "Breaking news: scientists have discovered",
    "My favorite book is",
    "<|im_start|>user\nWhat is the tallest mountain?<|im_end|>\n<|im_start|>assistant\n",
    # a long prompt: prefilled in chunks of the 256-token budget, mixed with decodes
    " ".join(["The history of the river valley is long and full of change."] * 40),
]
