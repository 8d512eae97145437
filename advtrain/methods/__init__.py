"""The registry of training methods (:data:`METHODS`) and the methods that
are one module each: a policy with its own training objective and its preset."""
from .aaer import AAERPolicy, NAAERTrainer, RSAAERTrainer
from .elle import ELLEAPolicy, ELLEATrainer, ELLEPolicy, ELLETrainer
from .free_at import FreeATPolicy, FreeATTrainer
from .gradalign import GradAlignPolicy, GradAlignTrainer
from .liet import LIETPolicy, LIETTrainer
from .mart import MARTPolicy, MARTTrainer
from .registry import METHODS, Method, Passes, get_method, method_names
from .trades import TRADESPolicy, TRADESTrainer

__all__ = ["METHODS", "Method", "Passes", "get_method", "method_names",
           "GradAlignPolicy", "GradAlignTrainer", "FreeATPolicy", "FreeATTrainer",
           "TRADESPolicy", "TRADESTrainer", "MARTPolicy", "MARTTrainer",
           "AAERPolicy", "NAAERTrainer", "RSAAERTrainer", "LIETPolicy", "LIETTrainer",
           "ELLEPolicy", "ELLETrainer", "ELLEAPolicy", "ELLEATrainer"]
