"""Data: corpora -> sentencepiece -> seqio tasks -> packed numpy batches.

    from routing_lm import data
    pipe = data.make_pipeline(config.data)

Modules: `corpus` (stdlib_text / text_files documents and their split), `tokenizer`
(train-once sentencepiece cache), `tasks` (seqio Tasks and packing; the only module
that imports TensorFlow/seqio, loaded lazily), `pipeline` (the trainer's entry point).
Importing this package does not load TensorFlow.
"""
from routing_lm.data.corpus import DataError
from routing_lm.data.pipeline import ArrayPipeline, Pipeline, StreamPipeline, make_pipeline

__all__ = ["DataError", "Pipeline", "ArrayPipeline", "StreamPipeline", "make_pipeline"]
