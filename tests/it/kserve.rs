//! KServe v2 / Open Inference Protocol end to end with a tonic client (the Python test with
//! Triton's own client runs in .ci/run).

use std::collections::HashMap;

use crate::common::*;
use tonic::Code;
use voxconv::config::Config;
use voxconv::proto::inference as kv;
use voxconv::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;

fn request(shape: Vec<i64>, datatype: &str) -> kv::ModelInferRequest {
    kv::ModelInferRequest {
        model_name: "sobel3d".into(),
        id: "abc".into(),
        inputs: vec![kv::model_infer_request::InferInputTensor {
            name: "input".into(),
            datatype: datatype.into(),
            shape,
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_and_typed_inputs_give_the_kernels_result() {
    let models = models();
    let server = TestServer::start(Config::for_tests(), models.clone()).await;
    let mut c = GrpcInferenceServiceClient::connect(server.url())
        .await
        .unwrap();
    let shape = [1usize, 1, 6, 7, 8];
    let x = voxconv::kernel::seeded(shape.iter().product(), 3);
    let want = kernel_output(&models, "sobel3d", shape, &x);
    let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();

    let mut raw = request(dims.clone(), "FP32");
    raw.raw_input_contents = vec![f32_bytes(&x)];
    let mut params = HashMap::new();
    params.insert(
        "priority".to_string(),
        kv::InferParameter {
            parameter_choice: Some(kv::infer_parameter::ParameterChoice::Int64Param(1)),
        },
    );
    params.insert(
        "timeout".to_string(),
        kv::InferParameter {
            parameter_choice: Some(kv::infer_parameter::ParameterChoice::Int64Param(10_000_000)),
        },
    );
    params.insert(
        "x-unknown".to_string(),
        kv::InferParameter {
            parameter_choice: Some(kv::infer_parameter::ParameterChoice::StringParam(
                "ok".into(),
            )),
        },
    );
    raw.parameters = params;
    let r = c.model_infer(raw).await.unwrap().into_inner();
    assert_eq!(r.id, "abc");
    assert_eq!(r.outputs[0].name, "output");
    assert_eq!(r.outputs[0].shape, vec![1, 3, 6, 7, 8]);
    assert_eq!(floats(&r.raw_output_contents[0]), want);

    let mut typed = request(dims.clone(), "FP32");
    typed.inputs[0].contents = Some(kv::InferTensorContents {
        fp32_contents: x.clone(),
        ..Default::default()
    });
    let r = c.model_infer(typed).await.unwrap().into_inner();
    assert_eq!(floats(&r.raw_output_contents[0]), want);

    let ints: Vec<i32> = (0..x.len() as i32).map(|i| i % 300 - 150).collect();
    let as_f32: Vec<f32> = ints.iter().map(|&v| v as f32).collect();
    let mut int16 = request(dims.clone(), "INT16");
    int16.inputs[0].contents = Some(kv::InferTensorContents {
        int_contents: ints,
        ..Default::default()
    });
    let r = c.model_infer(int16).await.unwrap().into_inner();
    assert_eq!(
        floats(&r.raw_output_contents[0]),
        kernel_output(&models, "sobel3d", shape, &as_f32)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_and_a_stream_that_survives_them() {
    let server = TestServer::start(Config::for_tests(), models()).await;
    let mut c = GrpcInferenceServiceClient::connect(server.url())
        .await
        .unwrap();
    let x = f32_bytes(&[0.5; 125]);
    let dims = vec![1i64, 1, 5, 5, 5];

    let mut both = request(dims.clone(), "FP32");
    both.raw_input_contents = vec![x.clone()];
    both.inputs[0].contents = Some(kv::InferTensorContents {
        fp32_contents: vec![0.0; 125],
        ..Default::default()
    });
    let e = c.model_infer(both).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("both raw and typed"),
        "{}",
        e.message()
    );

    let mut bad_type = request(dims.clone(), "FP64");
    bad_type.raw_input_contents = vec![x.clone()];
    let e = c.model_infer(bad_type).await.unwrap_err();
    assert!(
        e.message().contains("inputs[0].datatype") && e.message().contains("FP64"),
        "{}",
        e.message()
    );

    let mut half_typed = request(dims.clone(), "FP16");
    half_typed.inputs[0].contents = Some(kv::InferTensorContents::default());
    let e = c.model_infer(half_typed).await.unwrap_err();
    assert!(
        e.message().contains("raw_input_contents"),
        "{}",
        e.message()
    );

    // The `timeout` parameter (µs) bounds the call beside the gRPC deadline.
    let mut slow = request(vec![1, 1, 96, 96, 96], "UINT8");
    slow.model_name = "gaussian3d".into();
    slow.raw_input_contents = vec![vec![1u8; 96 * 96 * 96].into()];
    slow.outputs = vec![];
    let mut tp = HashMap::new();
    tp.insert(
        "timeout".to_string(),
        kv::InferParameter {
            parameter_choice: Some(kv::infer_parameter::ParameterChoice::Int64Param(1)),
        },
    );
    slow.parameters = tp;
    let e = c.model_infer(slow).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");

    let mut unknown = request(dims.clone(), "FP32");
    unknown.model_name = "nope".into();
    unknown.raw_input_contents = vec![x.clone()];
    assert_eq!(
        c.model_infer(unknown).await.unwrap_err().code(),
        Code::NotFound
    );

    // Too large for one message: refused with a pointer to the streaming API.
    let big = vec![0u8; 128 * 128 * 64];
    let mut large = request(vec![1, 1, 64, 128, 128], "UINT8");
    large.raw_input_contents = vec![big.into()];
    let e = c.model_infer(large).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().contains("InferStream"), "{}", e.message());

    // ModelStreamInfer: good, bad (reported in error_message), good again on one stream.
    let good = || {
        let mut r = request(dims.clone(), "FP32");
        r.raw_input_contents = vec![x.clone()];
        r
    };
    let mut bad = request(vec![1, 1, 5, 5], "FP32");
    bad.id = "bad".into();
    bad.raw_input_contents = vec![x.clone()];
    let mut s = c
        .model_stream_infer(tokio_stream::iter(vec![good(), bad, good()]))
        .await
        .unwrap()
        .into_inner();
    let mut replies = Vec::new();
    while let Some(m) = s.message().await.unwrap() {
        replies.push(m);
    }
    assert_eq!(replies.len(), 3);
    assert!(replies[0].error_message.is_empty());
    assert!(
        replies[1].error_message.contains("inputs[0].shape"),
        "{}",
        replies[1].error_message
    );
    assert_eq!(replies[1].infer_response.as_ref().unwrap().id, "bad");
    assert!(replies[2].error_message.is_empty());
    assert_eq!(
        replies[2]
            .infer_response
            .as_ref()
            .unwrap()
            .raw_output_contents
            .len(),
        1
    );

    let ready = c
        .model_ready(kv::ModelReadyRequest {
            name: "gaussian3d".into(),
            version: String::new(),
        })
        .await
        .unwrap();
    assert!(ready.into_inner().ready);
    let cfg = c
        .model_config(kv::ModelConfigRequest {
            name: "filterbank16".into(),
            version: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(
        cfg.into_inner().config.unwrap().output[0].dims,
        vec![-1, 16, -1, -1, -1]
    );
}
