"""Moved: the text-to-image student is the one ARD student (models/student.py) with a TextStudentConfig."""

from ardistill.models.student import ARDStudent, TextARDStudent, TextStudentConfig, build_student  # noqa: F401

build_text_student = build_student
