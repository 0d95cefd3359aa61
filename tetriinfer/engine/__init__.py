"""One instance's machinery: block manager, step scheduler glue, model runner, sampler, engine."""
