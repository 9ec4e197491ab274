"""stn_pipeline: Self-Tuning Networks for TensorFlow 2."""
