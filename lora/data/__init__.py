"""Stage 1, data: from the bytes of a file to the batches the loop trains on.

Reading order:
    fileformat.py  bytes to records: encodings, JSON/JSONL/CSV containers
    records.py     records to conversations: schemas, bad rows, what was kept
    mixture.py     several --data files, each epoch's rows drawn by the files' weights
    prompt.py      prompt templates and label masking (what the model learns to say)
    prepare.py     the training set: split, tokenize in batches, summarize
    tokenized.py   the tokenized rows in flat int32 arrays, memory-mapped from disk
    cache.py       prepared data cached by a hash of file, tokenizer and settings
    batching.py    length-grouped batches with dynamic padding, epoch by epoch
    exam.py        multiple-choice exams: questions, options, answers (CMMLU CSV, JSON rows)
"""
