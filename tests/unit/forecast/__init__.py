"""Unit tests of trainer.forecast: pure, no export."""
