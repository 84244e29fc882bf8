"""Data-pipeline transforms (batchgeneratorsv2) used by the trainers; importable by the workers."""
