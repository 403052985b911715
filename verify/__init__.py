"""kvproof.verify"""
