"""Jinja2 templates; installed as the rtchat.templates package data."""
