"""kvproof.runtime"""
