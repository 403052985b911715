"""kvproof.kernels"""
