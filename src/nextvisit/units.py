"""Units of time shared by every stage, defined once."""

from datetime import timedelta

DAYS_PER_YEAR = 365.25  # Julian year: ages and horizons in years convert to days by this
US_PER_DAY = 86_400_000_000  # microseconds per day: MEDS times are timestamp[us]
END_OF_DAY = timedelta(days=1) - timedelta(microseconds=1)  # the last instant of a calendar day
