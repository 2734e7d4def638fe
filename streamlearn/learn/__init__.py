"""Learning on a stream: the state pytree, the plain and delta steps, replay, prequential passes."""
