"""CommonGen data and scoring (the official metric)."""
