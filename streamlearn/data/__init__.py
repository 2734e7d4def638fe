"""What a learner reads: stream sources, tokenizers, and the chunked token stream."""
