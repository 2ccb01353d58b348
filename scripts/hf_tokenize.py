"""Reference tokenizations for tests/gguf_tokenizers.rs: Hugging Face `tokenizers` (the Python
package, pinned in scripts/bench-compare-requirements.txt) on a model's own tokenizer.json.

    python hf_tokenize.py TOKENIZER_JSON TEXTS_JSON   (TEXTS_JSON: a list of strings)

prints one JSON object: {"ids": [[...], ...], "decoded": ["...", ...]}, ids without special
tokens added, decoded without skipping any.
"""

import json
import sys

from tokenizers import Tokenizer

tok = Tokenizer.from_file(sys.argv[1])
texts = json.load(open(sys.argv[2], encoding="utf-8"))
ids = [tok.encode(t, add_special_tokens=False).ids for t in texts]
decoded = [tok.decode(i, skip_special_tokens=False) for i in ids]
json.dump({"ids": ids, "decoded": decoded}, sys.stdout, ensure_ascii=True)
