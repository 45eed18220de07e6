"""Tests of rnf_fast.models."""
