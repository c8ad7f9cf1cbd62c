"""Plotly figures over trace frames: pure functions, trace DataFrame (+ run metadata) -> go.Figure."""
