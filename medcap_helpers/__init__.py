"""medcap: fine-tune BLIP with QLoRA on IU X-Ray chest radiographs.

Modules follow the pipeline's stages: :mod:`config`, :mod:`data`, :mod:`model`, :mod:`train`,
:mod:`metrics`, :mod:`merge`, :mod:`demo`, :mod:`pipeline`.
"""

from medcap_helpers.config import ConfigError, MedcapConfig

__all__ = ["ConfigError", "MedcapConfig"]
__version__ = "0.1.0"
