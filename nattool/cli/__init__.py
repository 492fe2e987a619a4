"""Typer commands: parse options, call one function below, render (rich or --json)."""
