"""Glue for training frameworks: callbacks that send each saved checkpoint to a running
entropy-probe service and bring the results back into the trainer's logs."""
