"""Pretraining data for BERT: raw text in, masked MLM + NSP batches out.

The pipeline, in the order the data flows, and the module of each step:

    corpus.read_documents / builtin_corpus_documents   text files, JSON Lines, CSV  ->  documents
        a document is a list of paragraphs (one sentence or paragraph per line, as in BERT's data)
    corpus.split_sentences                         paragraph -> sentences (rule-based, no nltk)
    minibert.tokenizer_training                    BERT's uncased WordPiece recipe on the same text
    shards.build_pretraining_shards                done once: sentences -> token ids (encode_batch)
        -> NSP sentence pairs (Google's create_pretraining_data.py) or packed full sentences
        -> fixed-size rows in memory-mapped files, cached under a key of (corpus, tokenizer, settings)
    dataset.PretrainingDataset                     memory-maps the rows; ds[i] is one example
    dataset.batches                                seeded, resumable, DDP-sharded index lists
    masking.MaskingCollator / mask_tokens          dynamic masking at batch time (RoBERTa): a fresh
        80/10/10 mask every epoch, drawn from a generator seeded per example

Imports point one way: corpus <- shards <- dataset <- masking (and tokenizer_training <- corpus).

Use
---
    documents, corpus_id = builtin_corpus_documents, BUILTIN_CORPUS_ID
    # or: documents = lambda: read_documents(paths); corpus_id = corpus_fingerprint(paths)
    tokenizer = load_or_train_tokenizer(documents(), 8192, cache_dir() / "tokenizers", corpus_id=corpus_id)
    shards = build_pretraining_shards(documents(), tokenizer, cache_dir() / "pretraining", seq_len=128,
                                      corpus_id=corpus_id)
    train = PretrainingDataset(shards, "train")
    collate = MaskingCollator.for_dataset(train, mask_prob=0.15, seed=seed)
    for epoch in ...:
        collate.epoch = epoch
        for indices in batches(len(train), global_batch, seed=seed, epoch=epoch, rank=rank,
                               world_size=world_size, start_step=resume_step):
            batch = collate(train.batch(indices))   # input_ids, attention_mask, token_type_ids,
                                                    # labels, next_sentence_label
A second run finds the tokenizer and the shards in the cache without reading the corpus. With
corpus_id=None the identity is a hash of the text instead (reading and hashing the built-in corpus
takes about 1.5 s).

Conventions
-----------
* ``next_sentence_label`` follows Hugging Face: 0 means segment B really follows A (IsNext),
  1 means B is a random segment from another document. ``labels`` (MLM) is -100 where no loss.
* A row is ``[CLS] A [SEP] B [SEP]`` padded with [PAD] to ``seq_len``; token type 0 covers [CLS], A
  and its [SEP], type 1 covers B and the final [SEP]. Without NSP a row is
  ``[CLS] s1 s2 ... [SEP]`` (all type 0) and there is no ``next_sentence_label`` at all, so that a
  model never averages an NSP loss over zero labels.
* Randomness is keyed, never carried: pair building uses ``random.Random`` seeded from (seed, split),
  the batch order a permutation seeded from (seed, epoch), and each example's mask a
  ``torch.Generator`` seeded from (seed, epoch, example index). So a run resumed at (epoch, step)
  sees the same batches with the same masks, and two ranks holding halves of a global batch mask
  exactly as one process holding all of it.

Limitations: preprocessing holds the corpus's token ids in memory (4 bytes a token, about 15 MB for
the built-in corpus); the rows themselves are streamed to disk.
"""
