"""kvproof.spec"""
