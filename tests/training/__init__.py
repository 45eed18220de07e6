"""Tests of rnf_fast.training."""
