"""Fine-tuning data: read labelled text, map labels to ids, tokenize once, batch by length.

The pipeline, module by module:

    readers.infer_task_type(train_path)                   -> task type, when none is given
    readers.load_examples(path)                           -> list[Example]: CSV/TSV, JSON Lines, CoNLL files
    tasks.movie_reviews() / tasks.load_glue(task, dir)    -> the built-in task and GLUE, as Examples
    labels.LabelVocab.from_examples(train)                -> label <-> id, from the training labels only
    encoding.encode_examples(tokenizer, examples, ...)    -> list[Features], tokenized once
    batching.train_batches(lengths, ...) / eval_batches   -> lists of example indices
    batching.collate(features, pad_token_id)              -> dict of padded tensors

examples.py holds what they all share: Example, DataError and the task types, "classification" (one
label per text), "regression" (a float per text), "multilabel" (a set of labels per text) and
"token-classification" (a tag per word). Imports point one way: examples <- labels <- readers <- tasks,
and labels <- encoding <- batching. Every problem with the input raises a DataError with a one-line
message that names the file, the line and the fix, before any training starts.
"""
