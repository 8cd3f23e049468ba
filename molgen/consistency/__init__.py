"""Consistency models for molecules: the iCT recipe, consistency tuning from EDM, multistep sampling."""
