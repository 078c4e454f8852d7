"""Activation: sends campaign messages when profiles enter segments."""
