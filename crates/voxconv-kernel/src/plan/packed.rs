//! Filters packed once: [`Conv3dPlan::pack_filters`] does the per-run packing (weight groups
//! for the microkernel, Winograd's transformed filters) ahead of time, so a model that runs
//! the same plan many times pays it once. Runs take either form through [`Filters`].

use std::borrow::Cow;

use crate::{avx512, winograd, KernelError};

use super::{Conv3dPlan, GemmImpl, Strategy};

/// A plan's filters in the layout its strategy and GEMM read. Valid only for plans with
/// the same filter shape, strategy and GEMM (checked on every run).
#[derive(Clone, Debug)]
pub struct PackedFilters {
    data: Vec<f32>,
    filters: [usize; 5],
    strategy: Strategy,
    gemm: GemmImpl,
    /// A sub-lattice plan's filters, packed for its undilated plan.
    inner: Option<Box<PackedFilters>>,
}

impl PackedFilters {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() * 4 + self.inner.as_ref().map_or(0, |p| p.bytes())
    }

    pub(super) fn inner(&self) -> Option<&PackedFilters> {
        self.inner.as_deref()
    }
}

/// The filters of a run: as given (`[C_out, C_in, kD, kH, kW]`, packed during the run) or
/// packed ahead by [`Conv3dPlan::pack_filters`].
#[derive(Clone, Copy, Debug)]
pub enum Filters<'a> {
    Raw(&'a [f32]),
    Packed(&'a PackedFilters),
}

impl<'a> From<&'a [f32]> for Filters<'a> {
    fn from(f: &'a [f32]) -> Self {
        Filters::Raw(f)
    }
}

impl<'a> From<&'a Vec<f32>> for Filters<'a> {
    fn from(f: &'a Vec<f32>) -> Self {
        Filters::Raw(f)
    }
}

impl<'a> From<&'a PackedFilters> for Filters<'a> {
    fn from(f: &'a PackedFilters) -> Self {
        Filters::Packed(f)
    }
}

impl Conv3dPlan {
    /// Packs `filters` (`[C_out, C_in, kD, kH, kW]`) for this plan's strategy and GEMM.
    pub fn pack_filters(&self, filters: &[f32]) -> Result<PackedFilters, KernelError> {
        crate::check_len("filters", self.shape.filters_len(), filters.len())?;
        if let Some(inner) = &self.inner {
            return Ok(PackedFilters {
                data: Vec::new(),
                filters: self.shape.filters,
                strategy: self.strategy,
                gemm: self.gemm,
                inner: Some(Box::new(inner.pack_filters(filters)?)),
            });
        }
        let data = match self.gemm {
            GemmImpl::Portable => filters.to_vec(),
            _ => self.pack(filters),
        };
        Ok(PackedFilters {
            data,
            filters: self.shape.filters,
            strategy: self.strategy,
            gemm: self.gemm,
            inner: None,
        })
    }

    /// The microkernel's layout of `filters` (empty for the portable GEMM, which reads them
    /// as given).
    pub(super) fn pack(&self, filters: &[f32]) -> Vec<f32> {
        match (self.gemm, self.strategy) {
            (GemmImpl::Avx512 | GemmImpl::Avx2, Strategy::Winograd) => {
                winograd::transform_filters(filters, self.shape.c_out(), self.shape.c_in())
            }
            // The pointwise strategy reads a k×1×1 filter's taps in the same order (a
            // 1×1×1 filter's order is the filter's).
            (GemmImpl::Avx512 | GemmImpl::Avx2, Strategy::Direct | Strategy::Pointwise) => {
                let shape = &self.shape;
                let taps = avx512::direct_tap_order(
                    filters,
                    shape.c_out(),
                    shape.c_in(),
                    shape.kernel_dims(),
                );
                avx512::pack_weights(&taps, shape.c_out(), shape.reduction_len())
            }
            (GemmImpl::Avx512 | GemmImpl::Avx2, _) => {
                avx512::pack_weights(filters, self.shape.c_out(), self.shape.reduction_len())
            }
            (GemmImpl::Portable, _) => Vec::new(),
        }
    }

    /// `filters` checked against this plan: raw ones by length, packed ones by the shape,
    /// strategy and GEMM they were packed for.
    pub(super) fn check_filters(&self, filters: Filters<'_>) -> Result<(), KernelError> {
        match filters {
            Filters::Raw(f) => crate::check_len("filters", self.shape.filters_len(), f.len()),
            Filters::Packed(p) => {
                if p.filters == self.shape.filters
                    && p.strategy == self.strategy
                    && p.gemm == self.gemm
                {
                    Ok(())
                } else {
                    Err(KernelError::Invalid {
                        what: "packed filters".into(),
                        reason: format!(
                            "packed for filters {:?}, strategy {}, GEMM {}; this plan has \
                             filters {:?}, strategy {}, GEMM {}",
                            p.filters,
                            p.strategy.name(),
                            p.gemm.name(),
                            self.shape.filters,
                            self.strategy.name(),
                            self.gemm.name()
                        ),
                    })
                }
            }
        }
    }

    /// The raw filters (portable GEMM) and the packed ones (microkernel) of a run.
    pub(super) fn filter_operands<'a>(&self, filters: Filters<'a>) -> (&'a [f32], Cow<'a, [f32]>) {
        match filters {
            Filters::Raw(f) => (f, Cow::Owned(self.pack(f))),
            Filters::Packed(p) => match p.gemm {
                GemmImpl::Portable => (&p.data, Cow::Owned(Vec::new())),
                _ => (&[], Cow::Borrowed(&p.data)),
            },
        }
    }
}
