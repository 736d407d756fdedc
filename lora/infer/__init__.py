"""Stage 3, inference: asking a trained adapter, and measuring whether it helped.

Reading order:
    options.py     infer.py's flags, declared as data
    sampling.py    generation settings: greedy by default, sampling with a temperature
    generate.py    loading base + adapter, prompting exactly as in training, generating
    answers.py     answering a file of questions: batched, streamed, resumable
    chat.py        a conversation on standard input, from a terminal or piped in
    score.py       did it help? reference likelihood, BLEU/ROUGE, answer health
    exam.py        did it learn, what did it forget? multiple-choice accuracy before and after
"""
